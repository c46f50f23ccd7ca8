"""The dispatcher against a real database and a fake Ray Jobs API with the same five methods."""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from align.spec import parse_spec
from align.stage_launch import StageLaunch
from services.db import artifacts, auth, events, jobs, reports, transitions
from services.db.models import Job, StageRun, utcnow
from services.dispatcher import REPO_ROOT, START_GRACE_SECONDS, Dispatcher, RayJobs
from services.settings import Settings

STAGES = [
    {"type": "sft", "data": {"path": "data/sft.jsonl"}},
    {"type": "rm", "data": {"path": "data/prefs.jsonl"}},
    {"type": "dpo", "data": {"path": "data/prefs.jsonl"}},
]


class FakeRay:
    """Ray's view of submissions: ``status[id]``; tests move jobs along by setting it."""

    def __init__(self, stop_ends_job: bool = True):
        self.status: dict[str, str] = {}
        self.submissions: list[dict] = []
        self.stopped: list[str] = []
        self.stop_ends_job = stop_ends_job
        self._lock = threading.Lock()

    def submit_job(self, *, entrypoint, submission_id, runtime_env, entrypoint_num_cpus=0):
        with self._lock:
            if submission_id in self.status:
                raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
            self.status[submission_id] = "PENDING"
            self.submissions.append(
                {
                    "entrypoint": entrypoint,
                    "submission_id": submission_id,
                    "runtime_env": runtime_env,
                    "entrypoint_num_cpus": entrypoint_num_cpus,
                }
            )
            return submission_id

    def get_job_status(self, submission_id):
        return self.status.get(submission_id)

    def stop_job(self, submission_id):
        self.stopped.append(submission_id)
        if self.stop_ends_job and self.status.get(submission_id) in ("PENDING", "RUNNING"):
            self.status[submission_id] = "STOPPED"
        return submission_id in self.status

    def get_job_info(self, submission_id):
        return {"status": self.status[submission_id]} if submission_id in self.status else None

    def get_job_logs(self, submission_id):
        return ""

    def ticket(self, n: int = -1) -> dict:
        return json.loads(self.submissions[n]["runtime_env"]["env_vars"]["ALIGN_TICKET"])


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(
        database_url=database_url,
        artifact_root="/store",
        work_root="/work-root/",
        report_secret="s3cret",
        max_attempts=3,
        lease_seconds=60,
        dispatcher_poll_seconds=0.01,
        ray_address="http://ray:8265",
    )


@pytest.fixture
def tenant_id(session_factory) -> str:
    with session_factory.begin() as s:
        return auth.create_tenant(s, "acme").id


@pytest.fixture
def ray() -> FakeRay:
    return FakeRay()


@pytest.fixture
def dispatcher(settings, session_factory, ray) -> Dispatcher:
    return Dispatcher(settings, session_factory, ray, owner_id="d1")


def new_job(session_factory, tenant_id, stages=STAGES) -> str:
    spec = parse_spec({"name": "demo", "base_model": "builtin:tiny", "stages": stages})
    with session_factory.begin() as s:
        return jobs.create_job(s, tenant_id, spec, None, None, max_attempts=3)[0].id


def stage_runs(session_factory, job_id) -> list[StageRun]:
    with session_factory() as s:
        return list(s.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.index)))


def states(session_factory, job_id) -> list[tuple[str, int]]:
    return [(r.state, r.attempt) for r in stage_runs(session_factory, job_id)]


def report(session_factory, run_id, attempt, type, payload) -> bool:
    with session_factory.begin() as s:
        return reports.apply_report(s, run_id, attempt, type, payload, lease_seconds=60)


def publish(session_factory, ticket: dict, name: str, kind: str = "adapter", gate: dict | None = None) -> str:
    artifact_id = f"demo.{name}-v1-{ticket['attempt']:012d}"
    assert report(
        session_factory,
        ticket["stage_run_id"],
        ticket["attempt"],
        "artifact",
        {
            "artifact_id": artifact_id,
            "uri": f"/store/{artifact_id}",
            "lineage": f"demo.{name}",
            "version": 1,
            "kind": kind,
            "manifest_hash": "sha256:" + "0" * 64,
            "parents": ticket["parents"],
            "metrics": {},
            "gate": gate,
        },
    )
    return artifact_id


def expire_lease(session_factory, run_id: str) -> None:
    with session_factory.begin() as s:
        s.execute(
            update(StageRun)
            .where(StageRun.id == run_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_submits_one_ray_job_per_attempt_with_its_ticket(
    dispatcher, session_factory, tenant_id, ray, settings, monkeypatch
):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    job_id = new_job(session_factory, tenant_id)
    dispatcher.tick()
    run = stage_runs(session_factory, job_id)[0]
    assert [s["submission_id"] for s in ray.submissions] == [f"align-{run.id}-a1"]
    submission = ray.submissions[0]
    assert submission["entrypoint"] == "python -m workers.entrypoint"
    assert submission["entrypoint_num_cpus"] == 0
    env = submission["runtime_env"]["env_vars"]
    assert env["OMP_NUM_THREADS"] == "2" and env["DS_ACCELERATOR"] == "cpu"
    assert env["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert set(submission["runtime_env"]) == {"env_vars"}
    ticket = ray.ticket()
    assert ticket == {
        "stage_run_id": run.id,
        "attempt": 1,
        "job_id": job_id,
        "spec": ticket["spec"],
        "index": 0,
        "start_policy": None,
        "reward_model": None,
        "parents": [],
        "artifact_root": "/store",
        "work_dir": f"/work-root/{job_id}/{run.id}",
        "resume": True,
        "require_checkpoint": False,
        "report": {"url": "http://127.0.0.1:8321/internal/reports", "token": ticket["report"]["token"],
                   "heartbeat_seconds": 5.0, "schedule_timeout_seconds": 1800.0},
        "mlflow_tracking_uri": None,
    }
    assert settings.check_report_token(run.id, 1, ticket["report"]["token"]) is None
    assert settings.check_report_token(run.id, 2, ticket["report"]["token"]) is not None
    assert parse_spec(ticket["spec"]).stage_names() == ["sft", "rm", "dpo"]
    for _ in range(2):
        dispatcher.tick()
    assert len(ray.submissions) == 1
    assert states(session_factory, job_id) == [("running", 1), ("pending", 0), ("pending", 0)]


def test_the_cluster_of_a_local_ray_is_pinned_in_every_runtime_env(dispatcher, session_factory, tenant_id, ray):
    """A service's own Ray: every job joins that cluster, never "the newest cluster on the host"."""
    new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    assert not {"RAY_ADDRESS", "ALIGN_RAY_CLUSTER"} & set(ray.submissions[0]["runtime_env"]["env_vars"])
    ray.cluster_address = "192.0.2.7:52279"
    new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    env = ray.submissions[1]["runtime_env"]["env_vars"]
    assert env["RAY_ADDRESS"] == env["ALIGN_RAY_CLUSTER"] == "192.0.2.7:52279"


def test_a_restarted_dispatcher_does_not_submit_again(settings, session_factory, tenant_id, ray, dispatcher):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    restarted = Dispatcher(settings, session_factory, ray, owner_id="d1")
    restarted.tick()
    assert len(ray.submissions) == 1
    # A claim that crashed before submitting is submitted by the restarted dispatcher, exactly once.
    second_job = new_job(session_factory, tenant_id, STAGES[:1])
    with session_factory.begin() as s:
        claimed = transitions.claim_next(s, "d1", 60)
    assert claimed.job_id == second_job
    restarted.tick()
    restarted.tick()
    assert [s["submission_id"] for s in ray.submissions][1:] == [f"align-{claimed.id}-a1"]
    assert states(session_factory, job_id) == [("running", 1)]


def test_success_runs_the_stages_in_order(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id)
    published = {}
    for index, name in enumerate(["sft", "rm", "dpo"]):
        dispatcher.tick()
        ticket = ray.ticket()
        assert (ticket["index"], ticket["attempt"], len(ray.submissions)) == (index, 1, index + 1)
        expected_policy = None if index == 0 else published["sft"]
        assert ticket["start_policy"] == (expected_policy and f"/store/{expected_policy}")
        assert ticket["parents"] == ([] if index == 0 else [published["sft"]])
        assert ticket["reward_model"] is None
        ray.status[ray.submissions[-1]["submission_id"]] = "RUNNING"
        assert report(session_factory, ticket["stage_run_id"], 1, "heartbeat", {"step": 1, "total_steps": 4})
        published[name] = publish(session_factory, ticket, name)
        ray.status[ray.submissions[-1]["submission_id"]] = "SUCCEEDED"
    dispatcher.tick()
    assert states(session_factory, job_id) == [("succeeded", 1)] * 3
    assert all(r.lease_owner is None for r in stage_runs(session_factory, job_id))
    with session_factory() as s:
        assert jobs.job_status(jobs.get_job(s, tenant_id, job_id)) == "succeeded"


def test_a_ppo_ticket_carries_the_reward_model_of_the_rm_stage(dispatcher, session_factory, tenant_id, ray):
    stages = [*STAGES[:2], {"type": "ppo", "data": {"path": "data/prompts.jsonl"}}]
    job_id = new_job(session_factory, tenant_id, stages)
    published = {}
    for name, kind in (("sft", "adapter"), ("rm", "reward_model")):
        dispatcher.tick()
        ticket = ray.ticket()
        published[name] = publish(session_factory, ticket, name, kind)
        ray.status[ray.submissions[-1]["submission_id"]] = "SUCCEEDED"
    dispatcher.tick()
    ticket = ray.ticket()
    assert (ticket["index"], len(ray.submissions)) == (2, 3)
    assert ticket["start_policy"] == f"/store/{published['sft']}"
    assert ticket["reward_model"] == f"/store/{published['rm']}"
    assert ticket["parents"] == [published["sft"], published["rm"]]
    # The worker's view of the same ticket keeps the reward model.
    assert StageLaunch.model_validate_json(json.dumps(ticket)).reward_model == f"/store/{published['rm']}"
    assert states(session_factory, job_id) == [("succeeded", 1), ("succeeded", 1), ("running", 1)]


def test_a_reward_model_that_cannot_be_found_fails_the_stage_without_blocking_the_queue(
    dispatcher, session_factory, tenant_id, ray
):
    named = {
        "type": "ppo", "data": {"path": "data/prompts.jsonl"}, "reward_model": "artifact:gone-v1-0123456789ab"
    }
    broken = new_job(session_factory, tenant_id, [named])
    behind = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    assert states(session_factory, broken) == [("failed", 1)]
    failed = stage_runs(session_factory, broken)[0]
    assert (failed.error_code, failed.error_field, failed.retryable) == (
        "missing_input",
        "stages[0].reward_model",
        False,
    )
    assert "artifact:gone-v1-0123456789ab" in failed.error_message and failed.lease_owner is None
    behind_run = stage_runs(session_factory, behind)[0]
    assert [s["submission_id"] for s in ray.submissions] == [f"align-{behind_run.id}-a1"]


def test_a_stored_spec_that_no_longer_validates_fails_the_stage_without_submitting(
    dispatcher, session_factory, tenant_id, ray
):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    with session_factory.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(spec={"name": "demo", "base_model": "builtin:tiny"}))
    dispatcher.tick()
    assert states(session_factory, job_id) == [("failed", 1)]
    failed = stage_runs(session_factory, job_id)[0]
    assert (failed.error_code, failed.error_field, failed.retryable) == ("bad_spec", "stages", False)
    assert "required field is missing" in failed.error_message and ray.submissions == []


def test_ray_success_without_an_artifact_is_retried(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    ray.status[ray.submissions[0]["submission_id"]] = "SUCCEEDED"
    dispatcher.tick()
    assert states(session_factory, job_id) == [("running", 2)]
    with session_factory() as s:
        retry = [
            e.payload for e in events.list_events(s, job_id, type="state") if e.payload["to"] == "retrying"
        ]
    assert [(p["error_code"], p["attempt"]) for p in retry] == [("no_artifact", 1)]


def test_an_artifact_recorded_before_the_ray_job_failed_stands(dispatcher, session_factory, tenant_id, ray):
    """The worker published and reported, then was killed while it shut down: the stage succeeds at attempt 1,
    with no retry that would publish the same result again."""
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    ticket = ray.ticket()
    artifact_id = publish(session_factory, ticket, "sft")
    ray.status[f"align-{ticket['stage_run_id']}-a1"] = "FAILED"
    dispatcher.tick()
    assert states(session_factory, job_id) == [("succeeded", 1)]
    with session_factory() as s:
        assert artifacts.artifact_for(s, ticket["stage_run_id"], 1).id == artifact_id
    assert len(ray.submissions) == 1


GATED = [
    {"type": "sft", "data": {"path": "data/sft.jsonl", "eval_fraction": 0.1},
     "gate": {"metric": "eval_loss", "max": 2.0}},
    {"type": "dpo", "data": {"path": "data/prefs.jsonl"}},
]


@pytest.mark.parametrize("passed", [True, False])
def test_a_failed_gate_keeps_the_artifact_and_stops_the_job(passed, dispatcher, session_factory, tenant_id, ray):
    """A stage whose gate fails ends failed_gate at its first attempt (no retry), with its artifact recorded;
    the next stage is cancelled and the job reads failed_gate, in the API, the list filter and the events."""
    from services.db import stats
    from services.schemas import StageRunPublic

    job_id = new_job(session_factory, tenant_id, GATED)
    dispatcher.tick()
    ticket = ray.ticket()
    value = 1.5 if passed else 2.5
    gate = {"metric": "eval_loss", "value": value, "baseline": None, "passed": passed,
            "reason": f"eval_loss {value} {'<=' if passed else '>'} max 2"}
    artifact_id = publish(session_factory, ticket, "sft", gate=gate)
    ray.status[f"align-{ticket['stage_run_id']}-a1"] = "SUCCEEDED"
    dispatcher.tick()
    runs = stage_runs(session_factory, job_id)
    with session_factory() as s:
        job = jobs.get_job(s, tenant_id, job_id)
        assert artifacts.artifact_for(s, ticket["stage_run_id"], 1).id == artifact_id
        gate_events = events.list_events(s, job_id, type="gate")
        listed = [j.id for j in jobs.list_jobs(s, tenant_id, state="failed_gate")[0]]
        by_status = stats.jobs_by_status(s)
        public = StageRunPublic.from_row(runs[0], artifact_id, gate)
    assert [e.payload for e in gate_events] == [gate]
    assert gate_events[0].level == ("info" if passed else "error")
    assert public.gate.passed is passed and public.gate.reason == gate["reason"]
    if passed:
        assert [(r.state, r.attempt) for r in runs] == [("succeeded", 1), ("running", 1)]
        assert jobs.job_status(job) == "running" and listed == [] and by_status == {"running": 1}
        return
    assert [(r.state, r.attempt) for r in runs] == [("failed", 1), ("cancelled", 0)]
    assert (runs[0].error_code, runs[0].error_field, runs[0].retryable) == ("failed_gate", "stages[0].gate", False)
    assert runs[0].error_message == f"gate failed: eval_loss 2.5 > max 2; artifact {artifact_id} is kept"
    assert jobs.job_status(job) == "failed_gate" and listed == [job_id] and by_status == {"failed_gate": 1}
    assert len(ray.submissions) == 1, "a failed gate is not retried"


def test_retryable_failure_resumes_from_the_checkpoint(dispatcher, session_factory, tenant_id, ray, settings):
    job_id = new_job(session_factory, tenant_id)
    dispatcher.tick()
    run_id = ray.ticket()["stage_run_id"]
    ray.status[f"align-{run_id}-a1"] = "RUNNING"
    assert report(
        session_factory, run_id, 1, "checkpoint", {"step": 50, "uri": f"/work-root/{job_id}/ckpt-50"}
    )
    assert report(
        session_factory,
        run_id,
        1,
        "failed",
        {"code": "nccl_timeout", "message": "collective timed out", "field": None, "retryable": True},
    )
    ray.status[f"align-{run_id}-a1"] = "FAILED"
    dispatcher.tick()
    assert states(session_factory, job_id) == [("running", 2), ("pending", 0), ("pending", 0)]
    with session_factory() as s:
        moves = [
            (e.payload["from"], e.payload["to"], e.attempt, e.payload.get("error_code"))
            for e in events.list_events(s, job_id, type="state")
        ][-3:]
    assert moves == [
        ("running", "retrying", 1, "nccl_timeout"),
        ("retrying", "queued", 1, None),
        ("queued", "running", 2, None),
    ]
    assert [s["submission_id"] for s in ray.submissions] == [f"align-{run_id}-a1", f"align-{run_id}-a2"]
    ticket = ray.ticket()
    assert (ticket["attempt"], ticket["require_checkpoint"]) == (2, True)
    assert settings.check_report_token(run_id, 2, ticket["report"]["token"]) is None
    refused = settings.check_report_token(run_id, 1, ticket["report"]["token"])
    assert refused == "bad report token for this stage run and attempt"
    assert ticket["work_dir"] == f"/work-root/{job_id}/{run_id}"
    assert not report(session_factory, run_id, 1, "heartbeat", {"step": 51, "total_steps": 100})
    assert states(session_factory, job_id)[0] == ("running", 2)


def test_non_retryable_failure_fails_the_job(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id)
    dispatcher.tick()
    run_id = ray.ticket()["stage_run_id"]
    assert report(
        session_factory,
        run_id,
        1,
        "failed",
        {
            "code": "bad_data",
            "message": "row 7: no 'messages'",
            "field": "stages[0].data.path",
            "retryable": False,
        },
    )
    ray.status[f"align-{run_id}-a1"] = "FAILED"
    dispatcher.tick()
    dispatcher.tick()
    assert states(session_factory, job_id) == [("failed", 1), ("cancelled", 0), ("cancelled", 0)]
    failed = stage_runs(session_factory, job_id)[0]
    assert (failed.error_code, failed.error_field, failed.retryable) == (
        "bad_data",
        "stages[0].data.path",
        False,
    )
    assert len(ray.submissions) == 1


def test_lost_worker_is_retried_until_the_attempts_are_used_up(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    for attempt in (1, 2, 3):
        assert states(session_factory, job_id) == [("running", attempt)]
        ray.status[ray.submissions[-1]["submission_id"]] = "FAILED"
        dispatcher.tick()
    assert states(session_factory, job_id) == [("failed", 3)]
    failed = stage_runs(session_factory, job_id)[0]
    assert failed.error_code == "worker_lost"
    assert failed.error_message.endswith("(gave up after 3 of 3 attempts)")
    assert len(ray.submissions) == 3


@pytest.mark.parametrize("stop_ends_job", [True, False])
def test_expired_lease_is_rescued(dispatcher, session_factory, tenant_id, ray, stop_ends_job):
    ray.stop_ends_job = stop_ends_job
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    submission_id = ray.submissions[0]["submission_id"]
    ray.status[submission_id] = "RUNNING"
    run_id = ray.ticket()["stage_run_id"]
    expire_lease(session_factory, run_id)
    dispatcher.tick()
    assert ray.stopped == [submission_id]
    if not stop_ends_job:
        # Requeued only once Ray confirms the job has ended.
        assert states(session_factory, job_id) == [("running", 1)]
        ray.status[submission_id] = "STOPPED"
        dispatcher.tick()
    assert states(session_factory, job_id) == [("running", 2)]
    with session_factory() as s:
        assert (
            sum("lease_expired" in str(e.payload) for e in events.list_events(s, job_id, type="message")) == 1
        )
        retry = [
            e.payload for e in events.list_events(s, job_id, type="state") if e.payload["to"] == "retrying"
        ]
    assert [(p["error_code"], p["retryable"], p["attempt"]) for p in retry] == [("lease_expired", True, 1)]
    assert [s["submission_id"] for s in ray.submissions] == [submission_id, submission_id[:-1] + "2"]


def test_dispatcher_renews_the_lease_while_ray_prepares_the_job(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    run_id = ray.ticket()["stage_run_id"]
    soon = utcnow() + timedelta(seconds=5)
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id).values(lease_expires_at=soon))
    dispatcher.tick()
    assert stage_runs(session_factory, job_id)[0].lease_expires_at > utcnow() + timedelta(seconds=50)
    # Running, but its entrypoint has not reported yet (its imports): still the dispatcher's to renew.
    ray.status[ray.submissions[0]["submission_id"]] = "RUNNING"
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id).values(lease_expires_at=soon))
    dispatcher.tick()
    assert stage_runs(session_factory, job_id)[0].lease_expires_at > utcnow() + timedelta(seconds=50)
    # Once its heartbeats come, they alone renew it.
    assert report(session_factory, run_id, 1, "heartbeat", {"phase": "starting"})
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id).values(lease_expires_at=soon))
    dispatcher.tick()
    assert stage_runs(session_factory, job_id)[0].lease_expires_at == soon
    # An entrypoint that never reports gets START_GRACE_SECONDS after the claim, no more.
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id).values(
            phase=None, lease_expires_at=soon, started_at=utcnow() - timedelta(seconds=START_GRACE_SECONDS + 1)))
    dispatcher.tick()
    assert stage_runs(session_factory, job_id)[0].lease_expires_at == soon
    assert ray.stopped == []


def test_heartbeats_set_the_phase_and_say_each_change_once(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    run_id = ray.ticket()["stage_run_id"]
    assert report(session_factory, run_id, 1, "heartbeat", {"step": 0, "total_steps": 8})
    assert report(session_factory, run_id, 1, "heartbeat", {"phase": "waiting_for_resources", "detail": "1 GPU"})
    since = stage_runs(session_factory, job_id)[0].phase_since
    assert report(session_factory, run_id, 1, "heartbeat", {"phase": "waiting_for_resources"})
    run = stage_runs(session_factory, job_id)[0]
    assert (run.phase, run.phase_since, run.progress_step, run.total_steps) == ("waiting_for_resources", since, 0, 8)
    assert report(session_factory, run_id, 1, "heartbeat", {"phase": "training"})
    assert report(session_factory, run_id, 1, "heartbeat", {"step": 3, "total_steps": 8})
    run = stage_runs(session_factory, job_id)[0]
    assert (run.phase, run.progress_step) == ("training", 3) and run.phase_since > since
    with session_factory() as s:
        texts = [e.payload["text"] for e in events.list_events(s, job_id, type="message")]
    assert texts == ["phase: waiting_for_resources (1 GPU)", "phase: training"]


def running_attempt(dispatcher, session_factory, tenant_id, ray) -> tuple[str, str]:
    """A one-stage job whose first attempt the dispatcher submitted and has seen Ray run."""
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    dispatcher.tick()
    submission_id = ray.submissions[0]["submission_id"]
    ray.status[submission_id] = "RUNNING"
    dispatcher.tick()
    return job_id, submission_id


def test_an_attempt_ray_ran_then_forgot_fails_with_ray_lost_and_is_retried(
    dispatcher, session_factory, tenant_id, ray
):
    """The head restarted without its jobs: the dispatcher that submitted the attempt retries it at once."""
    job_id, submission_id = running_attempt(dispatcher, session_factory, tenant_id, ray)
    assert states(session_factory, job_id) == [("running", 1)]
    del ray.status[submission_id]  # a new head: no such job
    dispatcher.tick()
    assert states(session_factory, job_id) == [("running", 2)]
    assert [s["submission_id"] for s in ray.submissions] == [submission_id, submission_id[:-1] + "2"]
    with session_factory() as s:
        retry = [e.payload for e in events.list_events(s, job_id, type="state") if e.payload["to"] == "retrying"]
    assert [(p["error_code"], p["retryable"]) for p in retry] == [("ray_lost", True)]
    assert "its head restarted" in retry[0]["error_message"]


def test_a_lost_attempt_that_reported_a_retryable_error_is_ray_lost_and_a_final_one_stands(
    dispatcher, session_factory, tenant_id, ray
):
    """As the head goes down its entrypoint may still report what it saw; a failure for good is kept."""
    job_id, submission_id = running_attempt(dispatcher, session_factory, tenant_id, ray)
    failed = {"code": "stage_error", "message": "ActorDiedError: the actor died", "retryable": True}
    assert report(session_factory, ray.ticket()["stage_run_id"], 1, "failed", failed)
    del ray.status[submission_id]
    dispatcher.tick()
    ray.status[submission_id[:-1] + "2"] = "RUNNING"
    dispatcher.tick()
    bad = {"code": "bad_data", "message": "row 3", "field": "stages[0].data.path", "retryable": False}
    assert report(session_factory, ray.ticket()["stage_run_id"], 2, "failed", bad)
    ray.status.clear()
    dispatcher.tick()
    with session_factory() as s:
        ended = [e.payload for e in events.list_events(s, job_id, type="state")
                 if e.payload["to"] in ("retrying", "failed")]
    assert [(p["error_code"], p["attempt"]) for p in ended] == [("ray_lost", 1), ("bad_data", 2)]
    assert "the worker reported stage_error: ActorDiedError" in ended[0]["error_message"]


def test_a_job_another_dispatcher_submitted_is_not_called_lost(settings, session_factory, tenant_id, ray):
    """Another dispatcher may talk to another cluster: Ray's None there waits for the lease to run out."""
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    Dispatcher(settings, session_factory, ray, owner_id="d1").tick()
    run_id = ray.ticket()["stage_run_id"]
    assert report(session_factory, run_id, 1, "heartbeat", {"phase": "training"})
    ray.status.clear()
    Dispatcher(settings, session_factory, ray, owner_id="d2").tick()
    assert states(session_factory, job_id) == [("running", 1)]


def test_another_owners_claim_is_left_alone_until_its_lease_expires(
    dispatcher, session_factory, tenant_id, ray
):
    job_id = new_job(session_factory, tenant_id, STAGES[:1])
    with session_factory.begin() as s:
        run_id = transitions.claim_next(s, "crashed-dispatcher", 60).id
    dispatcher.tick()
    assert ray.submissions == [] and states(session_factory, job_id) == [("running", 1)]
    expire_lease(session_factory, run_id)
    dispatcher.tick()
    assert states(session_factory, job_id) == [("running", 2)]
    assert [s["submission_id"] for s in ray.submissions] == [f"align-{run_id}-a2"]


def test_cancelled_stage_has_its_ray_job_stopped(dispatcher, session_factory, tenant_id, ray):
    job_id = new_job(session_factory, tenant_id)
    dispatcher.tick()
    submission_id = ray.submissions[0]["submission_id"]
    ray.status[submission_id] = "RUNNING"
    with session_factory.begin() as s:
        jobs.cancel_job(s, tenant_id, job_id)
    dispatcher.tick()
    dispatcher.tick()
    assert ray.stopped == [submission_id] and ray.status[submission_id] == "STOPPED"
    assert states(session_factory, job_id) == [("cancelled", 1), ("cancelled", 0), ("cancelled", 0)]
    assert stage_runs(session_factory, job_id)[0].lease_owner is None
    assert len(ray.submissions) == 1


def test_two_dispatchers_claim_each_stage_run_once(settings, session_factory, tenant_id, ray):
    count = 20
    for _ in range(count):
        new_job(session_factory, tenant_id, STAGES[:1])
    dispatchers = [
        Dispatcher(settings, session_factory, ray, owner_id=o, max_claims_per_tick=100) for o in "ab"
    ]
    barrier = threading.Barrier(2)

    def run(d: Dispatcher) -> None:
        barrier.wait()
        d.claim_and_submit()

    threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    submitted = [s["submission_id"] for s in ray.submissions]
    assert len(submitted) == len(set(submitted)) == count
    with session_factory() as s:
        runs = list(s.scalars(select(StageRun)))
    assert {f"align-{r.id}-a1" for r in runs} == set(submitted)
    assert {(r.state, r.attempt) for r in runs} == {("running", 1)}
    assert {r.lease_owner for r in runs} <= {"a", "b"}


def test_run_forever_survives_a_failing_tick(dispatcher, caplog, monkeypatch):
    stop, calls = threading.Event(), []

    def tick() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("ray unreachable")
        stop.set()

    monkeypatch.setattr(dispatcher, "tick", tick)
    with caplog.at_level(logging.ERROR, logger="services.dispatcher"):
        dispatcher.run_forever(stop)
    assert len(calls) == 2
    assert "dispatcher tick failed" in caplog.text and "ray unreachable" in caplog.text


def test_ray_jobs_reads_an_unknown_submission_as_none():
    class Client:
        def get_job_status(self, submission_id):
            raise RuntimeError(f"Request failed with status code 404: Job {submission_id} does not exist.")

        def stop_job(self, submission_id):
            raise RuntimeError("Request failed with status code 500: boom.")

    ray_jobs = RayJobs.__new__(RayJobs)
    ray_jobs._client = Client()
    assert ray_jobs.get_job_status("align-sr_x-a1") is None
    with pytest.raises(RuntimeError, match="500"):
        ray_jobs.stop_job("align-sr_x-a1")


class ReadinessJobsApi:
    """The part of Ray's JobSubmissionClient that /readyz probes use; a status answer waits until two
    probes are both asking about the same earlier probe (two /readyz requests at once)."""

    def __init__(self, address: str):
        self.submitted: list[str] = []
        self.deleted: list[str] = []
        self.both_asking = threading.Barrier(2, timeout=10)

    def submit_job(self, *, entrypoint, submission_id, entrypoint_num_cpus, metadata):
        self.submitted.append(submission_id)
        return submission_id

    def get_job_status(self, submission_id):
        self.both_asking.wait()
        return type("Status", (), {"value": "SUCCEEDED"})()

    def delete_job(self, submission_id):
        self.deleted.append(submission_id)
        return True


def test_two_readiness_probes_at_once_both_pass(monkeypatch):
    """Both see the same ended probe and delete it: neither fails (a false 503) on the bookkeeping."""
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", ReadinessJobsApi)
    client = RayJobs("http://ray:8265")
    client.check_submission()
    (earlier,) = client._client.submitted
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            client.check_submission()
        except BaseException as error:  # reported by the test's thread below
            errors.append(error)

    threads = [threading.Thread(target=probe) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert client._client.deleted == [earlier, earlier]
    assert client._probes == set(client._client.submitted[1:]) and len(client._probes) == 2
