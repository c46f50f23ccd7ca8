"""GET /metrics against SQLite and Postgres: exact values after a known sequence of jobs, transitions, reports,
requests and dispatcher passes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from align.spec import parse_spec
from services.app import create_app
from services.db import auth, jobs, reports, transitions
from services.db.models import Job, StageRun, utcnow
from services.db.session import make_engine, make_sessionmaker
from services.dispatcher import Dispatcher
from services.metrics import ServiceMetrics
from services.settings import Settings

KEY = "metrics-key"


class PreparingRay:
    """Ray's view of submissions, as the dispatcher reads it; the test sets each status."""

    def __init__(self):
        self.status: dict[str, str] = {}

    def submit_job(self, *, entrypoint, submission_id, runtime_env, entrypoint_num_cpus=0):
        self.status[submission_id] = "PENDING"
        return submission_id

    def get_job_status(self, submission_id):
        return self.status.get(submission_id)

    def stop_job(self, submission_id):
        self.status[submission_id] = "STOPPED"
        return True

    def get_job_info(self, submission_id):
        return {"status": self.status[submission_id]} if submission_id in self.status else None

    def get_job_logs(self, submission_id):
        return ""


def scrape(client) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one scrape."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def new_job(session_factory, tenant_id, *types) -> list[str]:
    """A job with one stage per type; its stage run ids in order."""
    stages = [{"type": t, "data": {"path": f"data/{t}.jsonl"}, **({"reward": "exact_answer"} if t == "grpo" else {})}
              for t in types]
    spec = parse_spec({"name": "m", "base_model": "builtin:tiny", "stages": stages})
    with session_factory.begin() as s:
        job, _ = jobs.create_job(s, tenant_id, spec, None, None, max_attempts=2)
        return [run.id for run in job.stage_runs]


def claim(session_factory, run_id) -> None:
    with session_factory.begin() as s:
        assert transitions.claim(s, run_id, 0, "test", 300)


def set_times(session_factory, run_id, **ago_seconds) -> None:
    now = utcnow()
    values = {column: now - timedelta(seconds=seconds) for column, seconds in ago_seconds.items()}
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id).values(**values))


def report(session_factory, run_id, payload) -> None:
    with session_factory.begin() as s:
        assert reports.apply_report(s, run_id, 1, "metrics", payload, lease_seconds=300)


def test_metrics_after_a_known_sequence(database_url, session_factory, tmp_path):
    settings = Settings(database_url=database_url, bootstrap_api_key=KEY, run_dispatcher=False,
                        artifact_root=str(tmp_path / "a"), work_root=str(tmp_path / "w"), lease_seconds=60)
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        with session_factory.begin() as s:
            tenant_id = auth.tenant_for_key(s, KEY).id

        # The dispatcher of this process counts into the app's registry: one renewal while Ray prepares the job,
        # one rescue of an expired lease, which ends the attempt (requeued) and is claimed again.
        ray = PreparingRay()
        dispatcher = Dispatcher(settings, session_factory, ray, owner_id="d1",
                                metrics=client.app.state.metrics.dispatcher)
        (rescued,) = new_job(session_factory, tenant_id, "sft")
        dispatcher.tick()
        dispatcher.tick()
        ray.status[f"align-{rescued}-a1"] = "RUNNING"
        set_times(session_factory, rescued, lease_expires_at=1)
        dispatcher.tick()
        with session_factory() as s:
            assert (s.get(StageRun, rescued).state, s.get(StageRun, rescued).attempt) == ("running", 2)

        sft_then_dpo = new_job(session_factory, tenant_id, "sft", "dpo")
        claim(session_factory, sft_then_dpo[0])
        with session_factory.begin() as s:
            assert transitions.succeed(s, sft_then_dpo[0], 1)
        set_times(session_factory, sft_then_dpo[0], started_at=50, finished_at=8)  # 42 s
        claim(session_factory, sft_then_dpo[1])
        report(session_factory, sft_then_dpo[1], {"step": 1, "loss": 0.6, "tokens_per_s": 50.0})
        report(session_factory, sft_then_dpo[1], {"step": 1, "eval_loss": 0.7})  # no throughput: the one before

        (training,) = new_job(session_factory, tenant_id, "sft")
        claim(session_factory, training)
        report(session_factory, training, {"step": 1, "loss": 2.0, "tokens_per_s": 80.0})
        report(session_factory, training, {"step": 2, "loss": 1.5, "tokens_per_s": 100.0})

        (online,) = new_job(session_factory, tenant_id, "grpo")
        claim(session_factory, online)
        report(session_factory, online, {"step": 1, "loss": 0.1, "tokens_per_s": 30.0, "samples_per_s": 4.0})

        failing = new_job(session_factory, tenant_id, "sft", "rm")
        claim(session_factory, failing[0])
        with session_factory.begin() as s:
            assert transitions.fail(s, failing[0], 1, "bad_data", "row 3 has no messages", "stages[0].data.path")
        set_times(session_factory, failing[0], started_at=10, finished_at=5)  # 5 s

        (finished,) = new_job(session_factory, tenant_id, "sft")
        claim(session_factory, finished)
        with session_factory.begin() as s:
            assert transitions.succeed(s, finished, 1)
        set_times(session_factory, finished, started_at=500, finished_at=100)  # 400 s

        cancelled = new_job(session_factory, tenant_id, "sft")
        with session_factory.begin() as s:
            job_id = s.get(StageRun, cancelled[0]).job_id
            jobs.cancel_job(s, tenant_id, job_id)

        (waiting,) = new_job(session_factory, tenant_id, "sft")
        set_times(session_factory, waiting, queued_at=120)

        headers = {"Authorization": f"Bearer {KEY}"}
        assert client.get(f"/jobs/{job_id}", headers=headers).status_code == 200
        assert client.get("/jobs/job_nonexistent", headers=headers).status_code == 404
        assert client.get(f"/jobs/{job_id}").status_code == 401
        assert client.get("/no/such/path").status_code == 404
        values = scrape(client)
        second = scrape(client)

    def value(name, **labels):
        return values.get((name, tuple(sorted(labels.items()))))

    assert value("align_metrics_database_up") == 1
    assert {status: value("align_jobs", status=status) for status in
            ("queued", "running", "succeeded", "failed", "cancelled")} == {
        "queued": 1, "running": 4, "succeeded": 1, "failed": 1, "cancelled": 1}
    runs = {(dict(labels)["type"], dict(labels)["state"]): v for (name, labels), v in values.items()
            if name == "align_stage_runs" and v}
    assert runs == {("sft", "queued"): 1, ("sft", "running"): 2, ("sft", "succeeded"): 2, ("sft", "failed"): 1,
                    ("sft", "cancelled"): 1, ("dpo", "running"): 1, ("rm", "cancelled"): 1, ("grpo", "running"): 1}
    assert value("align_stage_runs", type="dpo", state="queued") == 0  # every state of a type that exists
    assert value("align_queue_depth") == 1
    assert 120 <= value("align_queue_oldest_age_seconds") < 180

    hist = {le: value("align_stage_duration_seconds_bucket", type="sft", state="succeeded", le=le)
            for le in ("10.0", "30.0", "60.0", "300.0", "900.0", "+Inf")}
    assert hist == {"10.0": 0, "30.0": 0, "60.0": 1, "300.0": 1, "900.0": 2, "+Inf": 2}
    assert value("align_stage_duration_seconds_count", type="sft", state="succeeded") == 2
    assert value("align_stage_duration_seconds_sum", type="sft", state="succeeded") == pytest.approx(442, abs=0.01)
    assert value("align_stage_duration_seconds_bucket", type="sft", state="failed", le="10.0") == 1
    assert value("align_stage_duration_seconds_sum", type="sft", state="failed") == pytest.approx(5, abs=0.01)
    assert not any(name.startswith("align_stage_duration") and dict(labels).get("state") == "cancelled"
                   for name, labels in values)  # cancelled before they started

    assert {dict(labels)["type"] + "/" + dict(labels)["error_code"]: v for (name, labels), v in values.items()
            if name == "align_stage_failures_total"} == {"sft/bad_data": 1}
    assert {dict(labels)["type"]: v for (name, labels), v in values.items()
            if name == "align_training_tokens_per_second"} == {"sft": 100.0, "dpo": 50.0, "grpo": 30.0}
    assert {dict(labels)["type"]: v for (name, labels), v in values.items()
            if name == "align_training_samples_per_second"} == {"grpo": 4.0}

    assert value("align_dispatcher_lease_renewals_total") == 1
    assert value("align_dispatcher_rescues_total") == 1
    assert value("align_dispatcher_failed_attempts_total", error_code="lease_expired", outcome="queued") == 1

    requests = {(dict(labels)["route"], dict(labels)["status"]): v for (name, labels), v in values.items()
                if name == "align_http_requests_total" and dict(labels)["method"] == "GET"}
    assert requests == {("/jobs/{job_id}", "200"): 1, ("/jobs/{job_id}", "404"): 1, ("/jobs/{job_id}", "401"): 1,
                        ("unmatched", "404"): 1}
    assert value("align_http_request_duration_seconds_count", method="GET", route="/jobs/{job_id}", status="404") == 1
    assert second[("align_http_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 1


def test_a_database_that_does_not_answer_reads_as_down(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path}/missing.db")
    (tmp_path / "missing.db").mkdir()  # a folder where the file should be: every query fails
    metrics = ServiceMetrics(make_sessionmaker(engine))
    names = {family.name: family for family in metrics.registry.collect()}
    assert names["align_metrics_database_up"].samples[0].value == 0
    assert "align_jobs" not in names and "align_dispatcher_rescues" in names
    engine.dispose()


def test_a_standalone_dispatcher_serves_its_counters_on_its_metrics_port():
    import httpx

    from align.ports import free_port
    from services.cli import start_metrics_server

    assert start_metrics_server(Settings(), ServiceMetrics()) is None  # no ALIGN_METRICS_PORT: nothing served
    metrics, port = ServiceMetrics(), free_port()
    metrics.dispatcher.rescues.inc()
    metrics.dispatcher.failed_attempts.labels("worker_lost", "failed").inc(2)
    server = start_metrics_server(Settings(metrics_port=port), metrics)
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        server.server_close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("align_dispatcher_rescues_total", ())] == 1
    failed = (("error_code", "worker_lost"), ("outcome", "failed"))
    assert samples[("align_dispatcher_failed_attempts_total", failed)] == 2
    assert not any(name.startswith(("align_jobs", "align_metrics_database_up")) for name, _ in samples)


def test_request_labels_are_templates_and_known_methods(_migrated_sqlite_template, tmp_path):
    """The dashboard's files count under their mount's template, ``/ui/{path}``; a method HTTP does not define
    counts as ``other``, so no request can add series of its own making."""
    import shutil

    shutil.copyfile(_migrated_sqlite_template, tmp_path / "align.db")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'align.db'}", bootstrap_api_key=KEY,
                        run_dispatcher=False, artifact_root=str(tmp_path / "a"), work_root=str(tmp_path / "w"))
    with TestClient(create_app(settings)) as client:
        assert client.get("/ui/").status_code == 200
        assert client.get("/ui/app.js").status_code == 200
        assert client.get("/ui/no-such-file.js").status_code == 404
        for method in ("FOO1", "FOO2", "BREW"):
            assert client.request(method, "/healthz").status_code == 405
            assert client.request(method, f"/{method}").status_code == 404
        values = scrape(client)
    requests = {(dict(labels)["method"], dict(labels)["route"], dict(labels)["status"]): v
                for (name, labels), v in values.items() if name == "align_http_requests_total"}
    assert requests == {("GET", "/ui/{path}", "200"): 2, ("GET", "/ui/{path}", "404"): 1,
                        ("other", "/healthz", "405"): 3, ("other", "unmatched", "404"): 3}


def test_a_rescue_counts_only_when_it_records_the_expired_lease(session_factory, tmp_path):
    """A dispatcher that saw a lease expire after another one's rescue ended the attempt counts no rescue."""
    settings = Settings(database_url="sqlite://", run_dispatcher=False, artifact_root=str(tmp_path / "a"),
                        work_root=str(tmp_path / "w"), lease_seconds=60)
    with session_factory.begin() as s:
        tenant_id = auth.create_tenant(s, "t").id
    (run_id,) = new_job(session_factory, tenant_id, "sft")
    claim(session_factory, run_id)
    ray = PreparingRay()
    counted = [ServiceMetrics(), ServiceMetrics()]
    first = Dispatcher(settings, session_factory, ray, owner_id="d1", metrics=counted[0].dispatcher)
    second = Dispatcher(settings, session_factory, ray, owner_id="d2", metrics=counted[1].dispatcher)
    first.rescue(run_id, 1, f"align-{run_id}-a1")
    with session_factory.begin() as s:  # the attempt ended (requeued) before the second dispatcher's report
        assert transitions.fail_attempt(s, run_id, 1, "lease_expired", "stopped", None, True) == "queued"
    second.rescue(run_id, 1, f"align-{run_id}-a1")
    assert [m.registry.get_sample_value("align_dispatcher_rescues_total") for m in counted] == [1, 0]


def test_jobs_by_status_agrees_with_each_jobs_status(session_factory):
    """One pass over stage runs, grouped by job, gives each job the status job_status derives for it."""
    from collections import Counter

    from services.db import stats
    from services.db.models import STAGE_STATES

    with session_factory.begin() as s:
        tenant_id = auth.create_tenant(s, "t").id
    mixes = [(a, b) for a in STAGE_STATES for b in STAGE_STATES]
    for first, second in mixes:
        runs = new_job(session_factory, tenant_id, "sft", "dpo")
        with session_factory.begin() as s:
            for run_id, state in zip(runs, (first, second)):
                s.execute(update(StageRun).where(StageRun.id == run_id).values(state=state))
    with session_factory() as s:
        expected = Counter(jobs.job_status(job) for job in s.scalars(select(Job)))
        assert stats.jobs_by_status(s) == dict(expected)
    assert len(expected) == 5


def test_two_dispatchers_rescuing_one_lease_count_and_record_it_once(session_factory, tmp_path):
    """Both read the lease as expired and not yet rescued; the second's rescue, after the first's, records and
    counts nothing more."""
    from services.db.models import Event

    settings = Settings(database_url="sqlite://", run_dispatcher=False, artifact_root=str(tmp_path / "a"),
                        work_root=str(tmp_path / "w"), lease_seconds=60)
    with session_factory.begin() as s:
        tenant_id = auth.create_tenant(s, "t").id
    (run_id,) = new_job(session_factory, tenant_id, "sft")
    claim(session_factory, run_id)
    counted = [ServiceMetrics(), ServiceMetrics()]
    for owner, metrics in zip(("d1", "d2"), counted):
        Dispatcher(settings, session_factory, PreparingRay(), owner_id=owner,
                   metrics=metrics.dispatcher).rescue(run_id, 1, f"align-{run_id}-a1")
    assert [m.registry.get_sample_value("align_dispatcher_rescues_total") for m in counted] == [1, 0]
    with session_factory() as s:
        messages = [e.payload.get("code") for e in s.scalars(select(Event).where(Event.stage_run_id == run_id))
                    if e.type == "message"]
    assert messages == ["lease_expired"]
