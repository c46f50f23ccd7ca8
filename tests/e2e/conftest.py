"""End-to-end set-up: a 2-node local Ray cluster with the Jobs API, and `align serve` on the real Postgres.

The service runs as its own process, exactly as a deployment runs it, pointed at the cluster through
``ALIGN_RAY_ADDRESS``; the tests talk to it over HTTP with :class:`align.client.Client`. The cluster and
the service start once per test session and every end-to-end module shares them: each test submits
jobs of its own and reads back only those, so none needs a fresh service, and each start costs 15-30 s
on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align.engine.dist import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
API_KEY = "e2e-test-key"
SHARED = {"ray_jobs_address", "service"}
_closers: list = []
"""How to stop what the shared fixtures started, in the order started; each closer runs once."""
_last_user = pytest.StashKey[str | None]()


def _uses_shared(item) -> bool:
    return item.path.is_relative_to(HERE) and bool(SHARED & set(getattr(item, "fixturenames", ())))


def pytest_collection_modifyitems(session, config, items) -> None:
    """Run the modules here that use the shared cluster or service first and one after another, each in
    its own order, so that they are up only while those modules run."""
    sharing = {item.path for item in items if _uses_shared(item)}
    slots = [index for index, item in enumerate(items) if item.path.is_relative_to(HERE)]
    ordered = sorted((items[index] for index in slots), key=lambda item: item.path not in sharing)
    for index, item in zip(slots, ordered, strict=True):
        items[index] = item


def pytest_collection_finish(session) -> None:
    """Note the last test here that uses the shared cluster or service: once it ends, both stop, rather
    than idling through the rest of the session's tests."""
    users = [item.nodeid for item in session.items if _uses_shared(item)]
    session.config.stash[_last_user] = users[-1] if users else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if item.nodeid == item.config.stash.get(_last_user, None):
        _close_shared()


def _close_shared() -> None:
    while _closers:
        _closers.pop()()


def _once(close):
    """``close`` wrapped to run at most once, registered in :data:`_closers`."""
    done = []

    def run() -> None:
        if not done:
            done.append(True)
            close()

    _closers.append(run)
    return run


@pytest.fixture(scope="session")
def ray_jobs_address():
    """Head and one worker node, 1 CPU each, so a 2-worker stage places one rank per node."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The Ray job runs `<this python> -m workers.entrypoint`; its raylet passes this PATH on.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    from ray._private.services import get_node_ip_address

    dashboard_port, gcs_port = free_port(), free_port()
    # Every process of this cluster inherits RAY_ADDRESS naming its own GCS. Without it Ray Train's
    # placement-group cleaner looks its controller up on the newest cluster of the host (another test
    # run's), finds none, and removes the placement group of a stage that is still training.
    earlier_address = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = f"{get_node_ip_address()}:{gcs_port}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": dashboard_port, "gcs_server_port": gcs_port},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    address = f"http://127.0.0.1:{dashboard_port}"

    def close() -> None:
        cluster.shutdown()
        if earlier_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = earlier_address

    stop = _once(close)
    try:
        _wait_for(lambda: _jobs_api_up(address), 60, "the Ray Jobs API")
        yield address
    finally:
        stop()


def _jobs_api_up(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{address}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _readyz(client) -> str:
    import httpx

    try:
        return client.http.get("/readyz").text
    except httpx.HTTPError as error:
        return f"no answer ({error})"


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {seconds:.0f} s")


@pytest.fixture(scope="session")
def service(ray_jobs_address, small_model, small_data, tmp_path_factory):
    """`align serve` on a fresh Postgres database; yields (client, settings env, log path)."""
    from databases import create_postgres_database, drop_postgres_database

    from align.client import Client
    from align.tiny import build_tiny
    from services.db.session import upgrade

    # Built here, once, rather than by the first stage's Ray workers, whose build would count against
    # the attempt's lease and compete with the cluster for the CPUs.
    build_tiny()
    root = tmp_path_factory.mktemp("service")
    database_url = create_postgres_database("align_e2e")
    upgrade(database_url)
    port = free_port()
    env = dict(
        os.environ,
        ALIGN_DATABASE_URL=database_url,
        ALIGN_RAY_ADDRESS=ray_jobs_address,
        ALIGN_WORKER_PYTHON=sys.executable,
        ALIGN_PORT=str(port),
        ALIGN_ARTIFACT_ROOT=str(root / "artifacts"),
        ALIGN_WORK_ROOT=str(root / "work"),
        ALIGN_DATA_ROOTS=json.dumps([str(small_data["sft"].parent), str(root / "data")]),
        ALIGN_MODEL_ROOTS=json.dumps([str(small_model)]),
        ALIGN_BOOTSTRAP_API_KEY=API_KEY,
        ALIGN_LEASE_SECONDS="120",
        ALIGN_DISPATCHER_POLL_SECONDS="0.5",
        ALIGN_HOME=str(root / "home"),
    )
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve"], env=env, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
    client = Client(f"http://127.0.0.1:{port}", API_KEY)

    def close() -> None:
        client.close()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        drop_postgres_database(database_url)

    stop = _once(close)
    try:
        try:
            _wait_for(lambda: process.poll() is None and client.ready(), 90, f"align serve (log: {log_path})")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; /readyz: {_readyz(client)}") from None
        yield client, env, log_path
    finally:
        stop()
