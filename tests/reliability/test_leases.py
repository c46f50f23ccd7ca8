"""Leases follow the attempt's liveness, on a real local Ray, real Postgres and real training.

A short lease (5 s) and a stage that waits for CPUs longer than that: the attempt is not killed, it shows
``waiting_for_resources`` meanwhile and succeeds once the CPUs are free. A stage that asks for a GPU on a
CPU cluster fails with ``unschedulable`` by its deadline, naming what it asked for and what the cluster
has. A hung attempt (its processes stopped, so its heartbeats stop) is rescued. A Ray head that restarts
and forgets its jobs: the running attempt fails with ``ray_lost`` and is submitted again.

One Ray head (2 CPUs) and one API (uvicorn in a thread) serve the module; each test drives a dispatcher of
its own in a thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import httpx
import psutil
import pytest
from databases import create_postgres_database, drop_postgres_database
from processes import job_processes
from servers import served
from sqlalchemy import select

from align.ports import free_port
from align.spec import parse_spec
from services import local_ray
from services.db import auth, jobs
from services.db.models import Event, StageRun
from services.db.session import make_engine, make_sessionmaker, upgrade
from services.dispatcher import Dispatcher, RayJobs
from services.settings import Settings

pytestmark = pytest.mark.slow

LEASE_SECONDS = 5.0


def _free_ports() -> dict[str, int]:
    from align.ports import free_port

    return {flag: free_port() for flag in local_ray.PORT_FLAGS}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A 2-CPU Ray head of the module's own; ``restart()`` stops it and starts it again on the same ports."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    home = tmp_path_factory.mktemp("ray-home")
    ports = _free_ports()
    state = SimpleNamespace(home=home, ports=ports, ray=None, jobs=None)

    def start() -> None:
        # The same ports as before when they are free again, else fresh ones.
        state.ray = local_ray.start(home, num_cpus=2, pick_ports=lambda attempt: ports if attempt == 1 else
                                    _free_ports())
        state.jobs = RayJobs(state.ray.dashboard_url, cluster_address=state.ray.gcs_address, local=state.ray)

    def restart() -> None:
        """The head crashes (its whole process group killed at once) and starts again."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(state.ray.process.pid, signal.SIGKILL)
        state.ray.stop()
        start()

    state.restart = restart
    start()
    try:
        yield state
    finally:
        state.ray.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_model, small_data) -> Iterator[SimpleNamespace]:
    """The API on a fresh Postgres database, with a tenant and its key; no dispatcher of its own."""

    from services.app import create_app

    root = tmp_path_factory.mktemp("leases")
    database_url = create_postgres_database("align_leases")
    upgrade(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    port = free_port()
    settings = Settings(
        database_url=database_url, artifact_root=str(root / "artifacts"), work_root=str(root / "work"),
        data_roots=[str(small_data["sft"].parent)], model_roots=[str(small_model)], run_dispatcher=False,
        report_secret="leases-test", lease_seconds=LEASE_SECONDS, dispatcher_poll_seconds=0.5,
        public_url=f"http://127.0.0.1:{port}", worker_python=sys.executable,
    )
    with factory.begin() as s:
        tenant = auth.create_tenant(s, "leases")
        _, key = auth.create_api_key(s, tenant.id, "test")
        tenant_id = tenant.id
    try:
        with served(create_app(settings, session_factory=factory), port=port), httpx.Client(
                base_url=settings.public_url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            yield SimpleNamespace(settings=settings, factory=factory, tenant_id=tenant_id, http=http)
    finally:
        engine.dispose()
        drop_postgres_database(database_url)


class Driven:
    """A dispatcher ticking in a thread, as ``align serve`` runs it."""

    def __init__(self, service, cluster, name: str, **settings):
        self.settings = service.settings.model_copy(update=settings)
        self.dispatcher = Dispatcher(self.settings, service.factory, cluster.jobs, owner_id=name)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.dispatcher.run_forever, args=(self.stop,), daemon=True)

    def __enter__(self) -> Driven:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join(30)


def new_job(service, small_model, small_data, *, max_attempts: int = 1, resources: dict | None = None,
            **stage) -> str:
    spec = parse_spec({
        "name": "leases", "base_model": str(small_model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "resources": resources or {"num_workers": 1, "cpus_per_worker": 2},
        "stages": [{"type": "sft", "data": {"path": str(small_data["sft"])}, "max_steps": 2, "log_every": 1,
                    "batch_size": 2, **stage}],
    })
    with service.factory.begin() as s:
        return jobs.create_job(s, service.tenant_id, spec, None, None, max_attempts=max_attempts)[0].id


def stage_run(service, job_id: str) -> StageRun:
    with service.factory() as s:
        return s.scalars(select(StageRun).where(StageRun.job_id == job_id)).one()


def events(service, job_id: str) -> list[Event]:
    with service.factory() as s:
        return list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


def phases(service, job_id: str) -> list[str]:
    return [e.payload["phase"] for e in events(service, job_id) if e.type == "message" and "phase" in e.payload]


def wait_for(condition: Callable[[], object], seconds: float, what: str,
             explain: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {seconds:.0f} s\n{explain()}")


def explain(service, cluster, job_id: str) -> Callable[[], str]:
    """What the stage run, its events and its Ray job's log say (for a failed wait)."""

    def text() -> str:
        run = stage_run(service, job_id)
        lines = [f"stage run: {run.state} attempt {run.attempt} phase {run.phase} error {run.error_code}: "
                 f"{run.error_message}"]
        lines += [f"event {e.type} {e.payload}" for e in events(service, job_id)]
        if run.submission_id:
            try:
                log = cluster.jobs.get_job_logs(run.submission_id).splitlines()
                lines += [line for line in log if "/internal/reports" not in line][-60:]
            except Exception as error:  # only for the failure message
                lines.append(f"no Ray log: {error}")
        return "\n".join(lines)

    return text


def heartbeat_senders(stage_run_id: str) -> list[psutil.Process]:
    """The processes of a stage run's Ray job that send its heartbeats: the entrypoint and the Ray Train
    worker."""
    return [process for process, cmdline, _ in job_processes(stage_run_id)
            if (cmdline.endswith("-m workers.entrypoint") and not cmdline.startswith("/bin/sh"))
            or cmdline.startswith("ray::RayTrainWorker")]


def hold_cpus(cluster, seconds: float, cpus: int = 1) -> str:
    """A Ray job that holds ``cpus`` of the cluster's CPUs for ``seconds``; returns its submission id."""
    submission_id = f"blocker-{time.monotonic_ns()}"
    cluster.jobs._client.submit_job(entrypoint=f"{sys.executable} -c 'import time; time.sleep({seconds})'",
                                    submission_id=submission_id, entrypoint_num_cpus=cpus)
    wait_for(lambda: cluster.jobs.get_job_status(submission_id) == "RUNNING", 60, "the blocking job runs")
    return submission_id


def test_a_stage_waiting_for_cpus_longer_than_its_lease_is_not_killed(service, cluster, small_model, small_data):
    """2 CPUs, one held by another job until the stage has waited for 3 leases; the stage asks for a worker of
    2 CPUs and has a lease of 5 s.

    Before, nothing renewed the lease once Ray ran the job: the attempt was rescued as lost while it waited."""
    blocker = hold_cpus(cluster, 600)
    job_id = new_job(service, small_model, small_data, max_attempts=1)
    started = time.monotonic()
    with Driven(service, cluster, "waiting"):
        run = wait_for(lambda: (r := stage_run(service, job_id)).phase in ("waiting_for_resources", "training")
                       and r, 60, "the stage shows it waits for resources", explain(service, cluster, job_id))
        if run.phase == "training":
            # Ray placed the stage's 2 CPUs beside the blocking job's reserved one (seen once in five runs):
            # the set-up did not make it wait, so this run has nothing to check.
            cluster.jobs.stop_job(blocker)
            wait_for(lambda: stage_run(service, job_id).state != "running", 300, "the stage ends")
            pytest.skip("the blocking job's CPU was not held against the stage; it trained without waiting")
        stage = service.http.get(f"/jobs/{job_id}").json()["stages"][0]
        assert stage["state"] == "running" and stage["phase"] == "waiting_for_resources"
        assert stage["phase_since"] is not None
        waiting_from = time.monotonic()
        time.sleep(3 * LEASE_SECONDS)
        assert stage_run(service, job_id).phase == "waiting_for_resources"
        cluster.jobs.stop_job(blocker)  # the CPU comes free
        wait_for(lambda: stage_run(service, job_id).state != "running", 300, "the stage ends",
                 explain(service, cluster, job_id))
    run = stage_run(service, job_id)
    assert time.monotonic() - waiting_from > 3 * LEASE_SECONDS
    assert (run.state, run.attempt, run.error_code) == ("succeeded", 1, None), run.error_message
    seen = phases(service, job_id)
    assert seen[:2] == ["starting", "waiting_for_resources"] and "training" in seen and "publishing" in seen
    changes = [e for e in events(service, job_id) if "phase" in e.payload]
    waiting, placed = changes[1], changes[2]
    assert "1 workers of 2 CPUs each" in waiting.payload["text"]
    waited = (placed.time - waiting.time).total_seconds()
    assert waited > 3 * LEASE_SECONDS
    print(f"waited >= {waited:.1f} s for CPUs with a {LEASE_SECONDS:g} s lease; stage done in "
          f"{time.monotonic() - started:.1f} s; phases {seen}")


def test_a_stage_asking_for_a_gpu_on_a_cpu_cluster_fails_unschedulable_by_its_deadline(
        service, cluster, small_model, small_data):
    job_id = new_job(service, small_model, small_data, max_attempts=3,
                     resources={"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1})
    with Driven(service, cluster, "unschedulable", schedule_timeout_seconds=8):
        wait_for(lambda: stage_run(service, job_id).phase == "waiting_for_resources", 60, "the stage waits")
        waiting_from = time.monotonic()
        wait_for(lambda: stage_run(service, job_id).state != "running", 60, "the stage ends")
    failed_after = time.monotonic() - waiting_from
    run = stage_run(service, job_id)
    assert (run.state, run.attempt, run.error_code, run.retryable) == ("failed", 1, "unschedulable", False)
    assert run.error_field == "resources"
    for part in ("resources.num_workers=1", "resources.cpus_per_worker=1", "resources.gpus_per_worker=1",
                 "the cluster has CPU 2, GPU 0 in all"):
        assert part in run.error_message
    assert 8 <= failed_after < 30, failed_after
    print(f"unschedulable after {failed_after:.1f} s of waiting (deadline 8 s): {run.error_message}")


def test_a_hung_attempt_whose_heartbeats_stop_is_rescued(service, cluster, small_model, small_data):
    job_id = new_job(service, small_model, small_data, max_attempts=2, max_steps=100000, log_every=1000)
    stopped: list[psutil.Process] = []
    with Driven(service, cluster, "hung") as driven:
        wait_for(lambda: stage_run(service, job_id).phase == "training", 90, "the stage trains")
        run_id = stage_run(service, job_id).id
        time.sleep(2 * LEASE_SECONDS)  # training goes on past its lease: its heartbeats renew it
        assert (stage_run(service, job_id).state, stage_run(service, job_id).attempt) == ("running", 1)
        for process in heartbeat_senders(run_id):
            process.send_signal(signal.SIGSTOP)
            stopped.append(process)
        hung_at = time.monotonic()
        assert len(stopped) == 2, "the entrypoint and its rank"
        try:
            wait_for(lambda: stage_run(service, job_id).attempt == 2, 60, "the attempt is rescued and retried")
            rescued_after = time.monotonic() - hung_at
        finally:
            for process in stopped:  # Ray has ended them by now, or not: they must not outlive the test
                with contextlib.suppress(psutil.Error):
                    process.send_signal(signal.SIGKILL)
                    process.send_signal(signal.SIGCONT)
        with service.factory.begin() as s:
            jobs.cancel_job(s, service.tenant_id, job_id)
        wait_for(lambda: stage_run(service, job_id).lease_owner is None, 60, "the retry's Ray job is stopped")
        assert driven.dispatcher.metrics.rescues._value.get() == 1
    states = [e.payload for e in events(service, job_id) if e.type == "state"]
    retried = next(p for p in states if p["to"] == "retrying")
    assert retried["error_code"] == "lease_expired" and retried["attempt"] == 1
    assert LEASE_SECONDS <= rescued_after < LEASE_SECONDS + 30
    print(f"hung attempt rescued {rescued_after:.1f} s after its heartbeats stopped (lease {LEASE_SECONDS:g} s)")


def test_a_ray_head_restart_fails_the_running_attempt_with_ray_lost_and_submits_it_again(
        service, cluster, small_model, small_data):
    """The head crashes and starts again on the same ports with no memory of its jobs (no GCS persistence).

    Its entrypoint may still report the error it saw as Ray went away: the attempt is ``ray_lost`` all the same."""
    job_id = new_job(service, small_model, small_data, max_attempts=2, max_steps=100000, log_every=1000)
    with Driven(service, cluster, "restart") as driven:
        wait_for(lambda: stage_run(service, job_id).phase == "training", 90, "the stage trains")
        run_id = stage_run(service, job_id).id
        restarted_at = time.monotonic()
        cluster.restart()
        up_at = time.monotonic()
        driven.dispatcher.ray = cluster.jobs  # the same address; a new client for the new head
        wait_for(lambda: stage_run(service, job_id).attempt == 2, 60, "the attempt is submitted again")
        reconciled_after = time.monotonic() - up_at
        wait_for(lambda: cluster.jobs.get_job_status(f"align-{run_id}-a2") is not None, 30,
                 "the new head has the second attempt")
        with service.factory.begin() as s:
            jobs.cancel_job(s, service.tenant_id, job_id)
        wait_for(lambda: stage_run(service, job_id).lease_owner is None, 60, "the retry's Ray job is stopped")
    states = [e.payload for e in events(service, job_id) if e.type == "state"]
    retried = next(p for p in states if p["to"] == "retrying")
    # ray_lost when the new head answers first; when the dying head still answered that the job FAILED, the
    # attempt ends on the worker's own retryable failure report, as any failed job does. Retried either way.
    assert retried["attempt"] == 1 and retried["error_code"] in ("ray_lost", "stage_error", "worker_lost"), retried
    assert stage_run(service, job_id).state == "cancelled"
    print(f"head down and up again in {up_at - restarted_at:.1f} s; ray_lost and attempt 2 submitted "
          f"{reconciled_after:.1f} s after it was up")


class RefusingRay:
    """A Jobs API whose head has no job agent: every submission is refused as Ray 2.x refuses it, until
    ``accept`` is set. (A real head's raylet shares the agent's fate in this Ray version, so the state
    cannot be made with a real one.)"""

    def __init__(self):
        self.accept = False
        self.submitted: list[str] = []

    def submit_job(self, *, entrypoint, submission_id, runtime_env, entrypoint_num_cpus=0):
        if not self.accept:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please "
                               "try again later.")
        self.submitted.append(submission_id)
        return submission_id

    def get_job_status(self, submission_id):
        return "PENDING" if submission_id in self.submitted else None

    def stop_job(self, submission_id):
        return False

    def get_job_info(self, submission_id):
        return None

    def get_job_logs(self, submission_id):
        return ""


def test_no_available_agent_uses_up_no_attempt(service, small_model, small_data):
    """Before, each refused submission let the lease run out and cost an attempt: 3 of 3 in 3 leases."""
    job_id = new_job(service, small_model, small_data, max_attempts=3)
    ray = RefusingRay()
    dispatcher = Dispatcher(service.settings, service.factory, ray, owner_id="no-agent")
    started = time.monotonic()
    while time.monotonic() - started < 3 * LEASE_SECONDS:
        dispatcher.tick()
        time.sleep(0.5)
    run = stage_run(service, job_id)
    assert (run.state, run.attempt, run.error_code) == ("running", 1, None)
    texts = [e.payload["text"] for e in events(service, job_id) if e.type == "message"]
    assert len(texts) == 1 and "No available agent" in texts[0] and "without using up an attempt" in texts[0]
    ray.accept = True
    dispatcher.tick()
    assert ray.submitted == [f"align-{run.id}-a1"]
    assert "after" in [e.payload["text"] for e in events(service, job_id) if e.type == "message"][-1]
    with service.factory.begin() as s:
        jobs.cancel_job(s, service.tenant_id, job_id)


def test_readyz_fails_when_ray_takes_no_job(tmp_path, monkeypatch):
    """/readyz submits a job: a head whose Jobs API answers but takes no job is not ready."""
    from fastapi.testclient import TestClient

    from services.app import create_app

    engine_url = f"sqlite:///{tmp_path / 'align.db'}"
    upgrade(engine_url)
    settings = Settings(database_url=engine_url, run_dispatcher=False, ready_probe_seconds=0)

    class NoAgent(RefusingRay):
        def check_submission(self):
            self.submit_job(entrypoint="true", submission_id="probe", runtime_env={})

    with TestClient(create_app(settings, ray_client=NoAgent())) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert "No available agent" in answer.json()["checks"]["ray"]

