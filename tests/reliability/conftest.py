"""Shared set-up of the fault trials that kill processes of a running service.

One local Ray (one node, 2 CPUs) and one API server (`align serve --no-dispatcher`) on a fresh Postgres
database start once per session and serve every such trial; dispatchers run as their own `align
dispatcher` processes, which the trials kill and start. Each trial submits jobs of its own and reads back
only those. Only the trials that use :func:`fault_service` start any of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.engine.dist import free_port

REPO = Path(__file__).resolve().parent.parent.parent
API_KEY = "fault-trials-key"
REPORT_SECRET = "fault-trials-report-secret"


FIGURES: list[str] = []
"""Lines of measured figures the trials add; written at the end of the test session's report."""


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("reliability figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Where a trial adds a line of its measured figures (:data:`FIGURES`)."""
    return FIGURES


def wait_for(condition, seconds: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {seconds:.0f} s")


@pytest.fixture
def postgres_url(request) -> str:
    """The session's migrated Postgres database, emptied: for trials about Postgres's row locks."""
    from sqlalchemy import text

    from services.db.session import make_engine

    url = request.getfixturevalue("_migrated_postgres_url")
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("SET LOCAL lock_timeout = '10s'"))
        connection.execute(text("TRUNCATE events, artifacts, stage_runs, jobs, api_keys, tenants RESTART IDENTITY "
                                "CASCADE"))
    engine.dispose()
    return url


@pytest.fixture(scope="session")
def fault_ray():
    """A one-node Ray with the Jobs API; yields its dashboard address. Every process of the cluster inherits
    RAY_ADDRESS naming its own GCS, so a stage's job never joins another cluster on this host."""
    import httpx
    from ray._private.services import get_node_ip_address
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    dashboard_port, gcs_port = free_port(), free_port()
    earlier_address = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port,
        "gcs_server_port": gcs_port})
    address = f"http://127.0.0.1:{dashboard_port}"

    def up() -> bool:
        try:
            return httpx.get(f"{address}/api/version", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90, "the Ray Jobs API")
        yield address
    finally:
        cluster.shutdown()
        if earlier_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = earlier_address


class FaultService:
    """The API server and its settings; :meth:`dispatcher` starts an `align dispatcher` against them."""

    def __init__(self, env: dict[str, str], client, database_url: str, root: Path):
        self.env, self.client, self.database_url, self.root = env, client, database_url, root
        self.dispatchers: list[subprocess.Popen] = []
        self.running: subprocess.Popen | None = None
        """The dispatcher the trials keep running between them (killed and replaced by some)."""
        self.started = 0

    def keep_dispatching(self) -> subprocess.Popen:
        """The running dispatcher, started if there is none."""
        if self.running is None or self.running.poll() is not None:
            self.started += 1
            self.running = self.dispatcher(f"{self.started}")
        return self.running

    def dispatcher(self, name: str) -> subprocess.Popen:
        log = open(self.root / f"dispatcher-{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "dispatcher"], env=self.env, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.dispatchers.append(process)
        return process

    def log_of(self, name: str) -> str:
        path = self.root / f"dispatcher-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_dispatchers(self) -> None:
        for process in self.dispatchers:
            if process.poll() is None:
                process.kill()
                process.wait(30)

    def sessions(self):
        from services.db.session import make_engine, make_sessionmaker

        return make_sessionmaker(make_engine(self.database_url))


@pytest.fixture(scope="session")
def fault_service(fault_ray, small_model, small_data, tmp_path_factory):
    """`align serve --no-dispatcher` on a fresh Postgres database, reachable by the cluster's workers; the
    small model and data are inside its roots."""
    from databases import create_postgres_database, drop_postgres_database

    from align.client import Client
    from services.db.session import upgrade

    root = tmp_path_factory.mktemp("fault-service")
    database_url = create_postgres_database("align_faults")
    upgrade(database_url)
    port = free_port()
    env = dict(
        os.environ,
        ALIGN_DATABASE_URL=database_url,
        ALIGN_RAY_ADDRESS=fault_ray,
        ALIGN_WORKER_PYTHON=sys.executable,
        ALIGN_PORT=str(port),
        ALIGN_PUBLIC_URL=f"http://127.0.0.1:{port}",
        ALIGN_REPORT_SECRET=REPORT_SECRET,
        ALIGN_ARTIFACT_ROOT=str(root / "artifacts"),
        ALIGN_WORK_ROOT=str(root / "work"),
        ALIGN_DATA_ROOTS=json.dumps([str(small_data["prefs"].parent)]),
        ALIGN_MODEL_ROOTS=json.dumps([str(small_model)]),
        ALIGN_BOOTSTRAP_API_KEY=API_KEY,
        ALIGN_LEASE_SECONDS="600",
        ALIGN_DISPATCHER_POLL_SECONDS="0.2",
        ALIGN_HOME=str(root / "home"),
        OMP_NUM_THREADS="1",
    )
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--no-dispatcher"], env=env,
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", API_KEY)
    service = FaultService(env, client, database_url, root)
    try:
        wait_for(lambda: server.poll() is None and client.ready(), 90, f"align serve (log: {log_path})")
        yield service
    finally:
        service.stop_dispatchers()
        client.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        drop_postgres_database(database_url)


@pytest.fixture(scope="session")
def dpo_baseline(fault_service, small_model, small_data):
    """The trials' DPO job run once without faults: its facts (:func:`trial_jobs.job_facts`)."""
    from trial_jobs import dpo_spec, job_facts, wait_finished

    fault_service.keep_dispatching()
    started = time.monotonic()
    job = fault_service.client.submit(dpo_spec(small_model, small_data, "baseline"))
    job = wait_finished(fault_service, job["id"])
    assert job["status"] == "succeeded", job
    facts = job_facts(fault_service, job)
    facts["seconds"] = time.monotonic() - started
    return facts
