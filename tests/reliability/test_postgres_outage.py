"""A Postgres outage, on a private server the tests stop and start (``private_postgres.py``).

While it is down, every route that needs the database answers 503 with ``Retry-After`` (never 500), the auth
look-up and the worker report endpoint included; ``/healthz`` stays 200 and ``/readyz`` names the database. The
same engine serves again once the server is back. A dispatcher backs off (one log line when the outage starts,
one when it ends) and polls at its usual pace again afterwards. A worker's reporter holds its reports without
holding up training and delivers them, in order and once each, after the outage. The trial at the end runs all
of it at once: `align serve` with its own Ray, a training stage, and the database stopped for 20 s mid-stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from private_postgres import PrivatePostgres
from prometheus_client.parser import text_string_to_metric_families
from servers import served
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from align.client import Client
from align.ports import free_port
from align.spec import parse_spec
from services.app import DATABASE_RETRY_AFTER_SECONDS, create_app
from services.db import auth, jobs, reports, transitions
from services.db.models import Artifact, Event
from services.db.session import database_unavailable, make_engine, make_sessionmaker, upgrade
from services.dispatcher import Dispatcher
from services.settings import Settings
from workers.report import Reporter

SECRET = "outage-test-secret"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres():
    """A private server for this module's tests; each test leaves it running."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def database(postgres) -> str:
    """A fresh, migrated database on the private server."""
    name = f"outage_{secrets.token_hex(6)}"
    admin = make_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = postgres.url.rsplit("/", 1)[0] + "/" + name
    upgrade(url)
    return url


@pytest.fixture
def service(tmp_path, database):
    """The API (no dispatcher) on the private database, with a tenant, its key and a queued job (made through the
    database layer: the API's own checks of a new job load the base model's tokenizer)."""
    data = tmp_path / "data"
    data.mkdir()
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 4)
    settings = Settings(database_url=database, artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), data_roots=[str(data)], model_roots=[str(data)],
                        report_secret=SECRET, run_dispatcher=False)
    factory = make_sessionmaker(make_engine(database))
    spec = {"name": "outage", "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 2}]}
    with factory.begin() as session:
        tenant = auth.create_tenant(session, "alice")
        _, key = auth.create_api_key(session, tenant.id, "test")
        parsed = parse_spec(spec)
        job, _ = jobs.create_job(session, tenant.id, parsed, None, parsed.hash(), max_attempts=3)
    app = create_app(settings, session_factory=factory)
    try:
        yield SimpleNamespace(app=app, settings=settings, factory=factory, key=key, spec=spec, job_id=job.id)
    finally:
        factory.kw["bind"].dispose()


def requests_to_every_route(app, job_id: str, spec: dict, report: dict) -> list[tuple[str, str, dict]]:
    """(method, path, request options) for every operation of the OpenAPI document, and the report endpoint."""
    values = {"job_id": job_id, "artifact_id": "adapter-v1-0123456789ab", "path": "adapter_model.safetensors"}
    calls = []
    for template, operations in app.openapi()["paths"].items():
        path = re.sub(r"\{(\w+)(:path)?\}", lambda m: values[m.group(1)], template)
        for method in operations:
            options = {"json": spec} if method == "post" else {}
            calls.append((method.upper(), path, options))
    calls.append(("POST", "/internal/reports", {"json": report}))
    return calls


def test_every_route_answers_503_with_retry_after_while_the_database_is_down(postgres, service):
    with TestClient(service.app) as client:
        client.headers["Authorization"] = f"Bearer {service.key}"
        with service.factory.begin() as session:
            run = transitions.claim_next(session, "test-owner", 300)
        token = service.settings.report_token(run.id, run.attempt)
        report = {"stage_run_id": run.id, "attempt": run.attempt, "type": "heartbeat",
                  "payload": {"step": 1, "total_steps": 2}}
        calls = requests_to_every_route(service.app, service.job_id, service.spec, report)

        postgres.stop()
        try:
            answers = {}
            for method, path, options in calls:
                headers = {"Authorization": f"Bearer {token}"} if path == "/internal/reports" else {}
                answers[method, path] = client.request(method, path, headers=headers, **options)
        finally:
            postgres.start()

        no_database = {("GET", "/healthz"): 200, ("HEAD", "/healthz"): 200, ("GET", "/metrics"): 200,
                       ("GET", "/readyz"): 503, ("HEAD", "/readyz"): 503}
        for (method, path), answer in answers.items():
            expected = no_database.get((method, path), 503)
            assert answer.status_code == expected, f"{method} {path}: {answer.status_code} {answer.text[:300]}"
            if (method, path) not in no_database:
                assert answer.headers["Retry-After"] == str(DATABASE_RETRY_AFTER_SECONDS), (method, path)
                assert answer.json() == {"detail": f"the database is unavailable; try again in "
                                                   f"{DATABASE_RETRY_AFTER_SECONDS} s"}
        assert len(answers) >= 14, "every operation was tried"
        for template, operations in service.app.openapi()["paths"].items():
            for method, operation in operations.items():
                if template not in ("/healthz", "/metrics"):
                    assert "503" in operation["responses"], f"{method} {template} documents its 503"
        ready = answers["GET", "/readyz"].json()
        assert ready["status"] == "unavailable" and ready["checks"]["database"].startswith("unreachable: ")
        assert "align_metrics_database_up 0.0" in answers["GET", "/metrics"].text

        # The same engine serves again: its pool's dead connections are tested and replaced (pool_pre_ping).
        deadline = time.monotonic() + 10
        while (again := client.get(f"/jobs/{service.job_id}")).status_code == 503:
            assert time.monotonic() < deadline, again.text
            time.sleep(0.2)
        assert again.status_code == 200 and client.get("/readyz").status_code == 200
        answer = client.post("/internal/reports", json=report, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text

        metrics = client.get("/metrics").text
    served_503 = counted(metrics, "align_http_requests_total", status="503")
    unavailable = counted(metrics, "align_http_database_unavailable_total")
    assert counted(metrics, "align_http_requests_total", status="500") == 0
    readyz = sum(1 for method, path in answers if path == "/readyz")  # GET and HEAD: 503 from its own check
    assert unavailable == len(answers) - len(no_database) and served_503 == unavailable + readyz


def counted(exposition: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``, in Prometheus's text format."""
    return sum(sample.value for family in text_string_to_metric_families(exposition) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_what_counts_as_the_database_being_unavailable():
    refused = OperationalError("SELECT 1", {}, Exception("connection refused"))
    assert database_unavailable(refused)
    try:
        try:
            raise refused
        except OperationalError as error:
            raise RuntimeError("a tick failed") from error
    except RuntimeError as wrapped:
        assert database_unavailable(wrapped)
    assert not database_unavailable(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not database_unavailable(ValueError("bad input"))


class TimedDispatcher(Dispatcher):
    """The real dispatcher, with the start time of each tick noted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticks: list[float] = []

    def tick(self) -> None:
        self.ticks.append(time.monotonic())
        super().tick()


def test_the_dispatcher_backs_off_while_the_database_is_down_and_resumes_after(postgres, database, caplog):
    settings = Settings(database_url=database, dispatcher_poll_seconds=0.05, dispatcher_max_backoff_seconds=0.4,
                        report_secret=SECRET)
    factory = make_sessionmaker(make_engine(database))
    dispatcher = TimedDispatcher(settings, factory, ray_client=None, owner_id="outage-test")
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
    caplog.set_level(logging.WARNING, logger="services.dispatcher")
    thread.start()
    try:
        time.sleep(0.5)
        postgres.stop()
        down_at = time.monotonic()
        time.sleep(3.0)
        postgres.start()
        up_at = time.monotonic()
        deadline = up_at + 5
        while "the database is back" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        back_at = time.monotonic()
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(5)
        factory.kw["bind"].dispose()
    assert not thread.is_alive()

    during = [t for t in dispatcher.ticks if down_at < t < up_at]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert 4 <= len(during) <= 12, f"{len(during)} ticks in a 3 s outage (about 60 at the usual pace)"
    assert 0.35 <= max(gaps) <= 0.7, gaps  # doubled up to the 0.4 s cap (a tick itself takes a little)
    after = [t for t in dispatcher.ticks if t > back_at]
    after_gaps = sorted(b - a for a, b in itertools.pairwise(after))
    assert len(after) >= 5 and after_gaps[len(after_gaps) // 2] < 0.2, f"the usual pace again: {after_gaps}"

    lines = [r for r in caplog.records if r.name == "services.dispatcher"]
    assert [r.getMessage().split(" (")[0].split(" after ")[0] for r in lines] == [
        "dispatcher: the database is unavailable", "dispatcher: the database is back"]
    assert all(r.exc_info is None for r in lines), "no traceback per tick"


def test_a_metrics_record_sent_again_is_stored_once(tmp_path, session_factory):
    """The worker sends a report again only when it did not learn that the first try was taken (the answer
    was lost, the service committed it): the same record right after itself is not stored twice. The same
    values at a later point of the attempt (after another record) are stored."""
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    spec = parse_spec({"name": "again", "base_model": "builtin:tiny",
                       "stages": [{"type": "sft", "data": {"path": str(data)}, "max_steps": 2}]})
    with session_factory.begin() as session:
        tenant = auth.create_tenant(session, "alice")
        job, _ = jobs.create_job(session, tenant.id, spec, None, spec.hash(), max_attempts=3)
        run = transitions.claim_next(session, "test-owner", 300)
    sent = [{"step": 1, "loss": 2.0}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}, {"step": 1, "loss": 2.0}]
    for payload in sent:
        with session_factory.begin() as session:
            assert reports.apply_report(session, run.id, run.attempt, "metrics", payload, lease_seconds=300)
    with session_factory() as session:
        stored = [e.payload for e in session.scalars(
            select(Event).where(Event.job_id == job.id, Event.type == "metrics").order_by(Event.id))]
    assert stored == [sent[0], sent[2], sent[3]]


def follow_metrics(url: str, key: str, job_id: str, steps: list[int], until: int) -> None:
    """Read the job's live event stream, noting each metrics record's step, until ``until`` steps came."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{url}/jobs/{job_id}/events", headers=headers, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                if event.get("type") == "metrics":
                    steps.append(event["payload"]["step"])
                    if len(steps) >= until:
                        return


def test_reports_sent_during_the_outage_arrive_after_it_in_order_and_once(postgres, service):
    """The reporter takes the service's Retry-After: reports sent meanwhile are held at once, without a try,
    so training does not wait; after the outage they arrive in order. A metrics record sent again (its first
    delivery was taken but the answer lost) is recorded once. A live event stream opened before the outage
    stays open through it and carries the records once they are in."""
    with served(service.app) as url:
        with service.factory.begin() as session:
            run = transitions.claim_next(session, "test-owner", 300)
        token = service.settings.report_token(run.id, run.attempt)
        reporter = Reporter(f"{url}/internal/reports", token, run.id, run.attempt, backoff=0.05, max_backoff=1.0,
                            deadline=30)
        assert reporter.send("metrics", {"step": 1, "loss": 2.0})
        streamed: list[int] = []
        follower = threading.Thread(target=follow_metrics, args=(url, service.key, service.job_id, streamed, 6),
                                    daemon=True)
        follower.start()
        deadline = time.monotonic() + 10
        while streamed != [1]:
            assert time.monotonic() < deadline, streamed
            time.sleep(0.05)

        postgres.stop()
        try:
            started = time.monotonic()
            for step in range(2, 7):
                assert not reporter.send("metrics", {"step": step, "loss": 2.0 / step})
            assert time.monotonic() - started < 1.0, "training did not wait on the reports"
            assert [held["payload"]["step"] for held in reporter.held] == [2, 3, 4, 5, 6]
        finally:
            postgres.start()
        reporter.close()
        assert not reporter.held
        follower.join(15)
        assert streamed == [1, 2, 3, 4, 5, 6], "the stream outlived the outage"

        body = {"stage_run_id": run.id, "attempt": run.attempt, "type": "metrics",
                "payload": {"step": 6, "loss": 2.0 / 6}}
        again = httpx.post(f"{url}/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})
        assert again.status_code == 200, again.text
        with service.factory() as session:
            steps = [e.payload["step"] for e in session.scalars(
                select(Event).where(Event.job_id == service.job_id, Event.type == "metrics").order_by(Event.id))]
        assert steps == [1, 2, 3, 4, 5, 6]
        metrics = httpx.get(f"{url}/metrics").text
        assert counted(metrics, "align_http_database_unavailable_total", route="/internal/reports") == 1, \
            "one try during the outage; the reports after it waited for Retry-After"


# ---------------------------------------------------------------------------------------------------------
# The trial: `align serve` (API, dispatcher and its own Ray) on the private server, a training stage, and the
# server stopped for OUTAGE_SECONDS while the stage trains.
# ---------------------------------------------------------------------------------------------------------

OUTAGE_SECONDS = 20.0
MAX_STEPS = 16
TRIAL_KEY = "outage-trial-key"


def start_service(tmp_path, database_url: str, small_model, small_data) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        ALIGN_DATABASE_URL=database_url,
        ALIGN_WORKER_PYTHON=sys.executable,
        ALIGN_PORT=str(port),
        ALIGN_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
        ALIGN_WORK_ROOT=str(tmp_path / "work"),
        ALIGN_DATA_ROOTS=json.dumps([str(small_data["sft"].parent)]),
        ALIGN_MODEL_ROOTS=json.dumps([str(small_model)]),
        ALIGN_BOOTSTRAP_API_KEY=TRIAL_KEY,
        ALIGN_REPORT_SECRET=SECRET,
        ALIGN_LEASE_SECONDS="900",  # a loaded machine may take minutes to start the worker group
        ALIGN_DISPATCHER_POLL_SECONDS="0.5",
        ALIGN_DISPATCHER_MAX_BACKOFF_SECONDS="4",
        ALIGN_HOME=str(tmp_path / "home"),
        OMP_NUM_THREADS="1",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    env.pop("ALIGN_RAY_ADDRESS", None)
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--ray-cpus", "2"], env=env,
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log_path


def stop_service(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Prober:
    """Requests to the API, one after another from a thread, each noted with its answer."""

    def __init__(self, url: str, job_id: str, spec: dict):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TRIAL_KEY}"}, timeout=10)
        self.calls = [("GET", f"/jobs/{job_id}", {}), ("GET", "/jobs", {}), ("POST", "/jobs", {"json": spec}),
                      ("GET", f"/jobs/{job_id}/events", {}), ("GET", f"/jobs/{job_id}/metrics", {}),
                      ("POST", f"/jobs/{job_id}/cancel", {"headers": {"Authorization": "Bearer not-a-key"}}),
                      ("GET", "/healthz", {}), ("GET", "/readyz", {})]
        self.answers: list[tuple[float, str, str, int, str | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for method, path, options in self.calls:
                sent = time.monotonic()
                try:
                    answer = self.client.request(method, path, **options)
                    self.answers.append((sent, method, path, answer.status_code, answer.headers.get("Retry-After")))
                except httpx.HTTPError as error:
                    self.answers.append((sent, method, path, 0, type(error).__name__))
            self.stop.wait(0.2)


@pytest.mark.slow
def test_trial_a_20_s_outage_while_a_stage_trains(postgres, database, tmp_path, small_model, small_data):
    spec = {"name": "outage-trial", "base_model": str(small_model),
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"zero_stage": 0, "precision": "fp32"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "stages": [{"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4,
                        "max_steps": MAX_STEPS, "checkpoint_every": 4, "lr": 1e-3, "seed": 7}]}
    started = time.monotonic()
    process, url, log_path = start_service(tmp_path, database, small_model, small_data)
    prober = None
    try:
        client = Client(url, TRIAL_KEY)
        wait_for(lambda: process.poll() is None and client.ready(), 90, f"align serve (log: {log_path})")
        ready = time.monotonic() - started
        job = client.submit(spec)
        submitted_at = time.monotonic()
        wait_for(lambda: (client.job(job["id"])["stages"][0]["progress"]["step"] or 0) >= 1, 300,
                 "the stage's first step", log_path)
        first_step = time.monotonic() - submitted_at
        stage = client.job(job["id"])["stages"][0]
        step_before = stage["progress"]["step"]
        trained = tmp_path / "work" / job["id"] / stage["id"] / "metrics.jsonl"

        postgres.stop()
        lines_at_stop = len(trained.read_text().splitlines())
        # Requests only while the server is down: a POST /jobs that got through would queue a second job.
        prober = Prober(url, job["id"], spec)
        prober.thread.start()
        time.sleep(OUTAGE_SECONDS)
        prober.stop.set()
        prober.thread.join(15)
        lines_before_start = len(trained.read_text().splitlines())
        postgres.start()
        restarted_at = time.monotonic()
        wait_for(lambda: client.http.get(f"/jobs/{job['id']}").status_code == 200, 30, "the API after the outage")
        api_back = time.monotonic() - restarted_at
        wait_for(lambda: client.job(job["id"])["status"] in ("succeeded", "failed", "cancelled"), 120,
                 "the job's end", log_path)
        job_done = time.monotonic() - restarted_at
        final = client.job(job["id"])
        metrics = client.http.get("/metrics").text
        client.close()
    finally:
        if prober is not None:
            prober.stop.set()
        stop_service(process)
    log = log_path.read_text(errors="replace")
    assert final["status"] == "succeeded", f"{final}\n{log[-4000:]}"

    # Every request sent while the server was down: 503 with Retry-After (503 from /readyz, 200 from /healthz);
    # never a 500 or a dropped connection.
    during = prober.answers
    by_status: dict[int, int] = {}
    for _sent, method, path, status, retry_after in during:
        by_status[status] = by_status.get(status, 0) + 1
        if path == "/healthz":
            assert status == 200
        elif path == "/readyz":
            assert status == 503
        else:  # the cancel with a bad key too: the key look-up needs the database
            assert status == 503 and retry_after == str(DATABASE_RETRY_AFTER_SECONDS), (method, path, status)
    assert by_status.get(503, 0) >= 50 and set(by_status) == {200, 503}, by_status
    assert counted(metrics, "align_http_requests_total", status="500") == 0
    reports_503 = counted(metrics, "align_http_database_unavailable_total", route="/internal/reports")
    assert reports_503 >= 1, "the worker's reports met the outage"

    # The dispatcher backed off: one line when the outage began, one when it ended; no traceback per tick.
    assert log.count("dispatcher: the database is unavailable") == 1, log[-4000:]
    assert log.count("dispatcher: the database is back") == 1, log[-4000:]

    # The stage trained through the outage; every step's metrics arrived afterwards, once each.
    assert lines_before_start > lines_at_stop, "the worker trained on while the database was down"
    engine = make_engine(database)
    with make_sessionmaker(engine)() as session:
        records = [e.payload for e in session.scalars(
            select(Event).where(Event.job_id == job["id"], Event.type == "metrics").order_by(Event.id))]
        artifact_rows = session.scalars(select(Artifact).where(Artifact.job_id == job["id"])).all()
        succeeded = session.scalars(select(Event).where(Event.job_id == job["id"], Event.type == "state")).all()
    engine.dispose()
    assert [r["step"] for r in records if "loss" in r] == list(range(1, MAX_STEPS + 1)), records
    assert len({json.dumps(r, sort_keys=True) for r in records}) == len(records), "no record stored twice"
    assert len(artifact_rows) == 1 and final["stages"][0]["attempt"] == 1
    assert [e.payload.get("to") for e in succeeded].count("succeeded") == 1, [e.payload for e in succeeded]
    print(f"\npostgres outage trial: {OUTAGE_SECONDS:.0f} s down at step {step_before}/{MAX_STEPS}; "
          f"{len(during)} requests during it: {by_status}; worker reports answered 503: {reports_503:.0f}; "
          f"API back {api_back:.1f} s after the restart, job done {job_done:.1f} s after; "
          f"whole trial {time.monotonic() - started:.0f} s (service ready {ready:.0f} s, first step {first_step:.0f} s "
          f"after the submission)")


def wait_for(condition, seconds: float, what: str, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    log = f"\n{log_path.read_text(errors='replace')[-4000:]}" if log_path is not None else ""
    raise TimeoutError(f"{what}: not within {seconds:.0f} s{log}")
