"""End-to-end set-up: a 2-node local Ray cluster with the Jobs API, and `align serve` on the real Postgres.

The service runs as its own process, exactly as a deployment runs it, pointed at the cluster through
``ALIGN_RAY_ADDRESS``; the tests talk to it over HTTP with :class:`align.client.Client`.
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

REPO = Path(__file__).resolve().parent.parent.parent
API_KEY = "e2e-test-key"


@pytest.fixture(scope="module")
def ray_jobs_address():
    """Head and one worker node, 1 CPU each, so a 2-worker stage places one rank per node."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # The Ray job runs `<this python> -m workers.entrypoint`; its raylet passes this PATH on.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    dashboard_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": dashboard_port},
    )
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    address = f"http://127.0.0.1:{dashboard_port}"
    _wait_for(lambda: _jobs_api_up(address), 60, "the Ray Jobs API")
    yield address
    cluster.shutdown()


def _jobs_api_up(address: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{address}/api/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up in {seconds:.0f} s")


@pytest.fixture(scope="module")
def service(ray_jobs_address, small_model, small_data, tmp_path_factory):
    """`align serve` on a fresh Postgres database; yields (client, settings env, log path)."""
    from databases import create_postgres_database, drop_postgres_database

    from align.client import Client
    from services.db.session import upgrade

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
        ALIGN_DATA_ROOTS=json.dumps([str(small_data["sft"].parent), str(root)]),
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
    try:
        _wait_for(lambda: process.poll() is None and client.ready(), 90, f"align serve (log: {log_path})")
        yield client, env, log_path
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        drop_postgres_database(database_url)
