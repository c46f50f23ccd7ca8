"""Two embedded `align serve` on one host, each with its own local Ray, each running a job at the same time.

Ray's "auto" address picks the newest cluster on the host, so a second service used to capture the
first one's stages. Each service here must run its stage on its own cluster: the rank reports the GCS
address it joined and its node id, and the submission exists in that cluster's Jobs API only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from test_service import finished, job_spec, wait_until

from align.engine.dist import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent.parent
API_KEY = "two-services-key"


class Service:
    def __init__(self, root: Path, name: str, small_model: Path, small_data: dict):
        from align.client import Client

        self.root = root / name
        self.home = self.root / "home"
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("ALIGN_")}
        env.update(
            {k: os.environ[k] for k in ("ALIGN_CACHE_DIR",) if k in os.environ},
            ALIGN_HOME=str(self.home),
            ALIGN_PORT=str(self.port),
            ALIGN_DATABASE_URL=f"sqlite:///{self.home / 'align.db'}",
            ALIGN_ARTIFACT_ROOT=str(self.root / "artifacts"),
            ALIGN_WORK_ROOT=str(self.root / "work"),
            ALIGN_DATA_ROOTS=json.dumps([str(small_data["sft"].parent)]),
            ALIGN_MODEL_ROOTS=json.dumps([str(small_model)]),
            ALIGN_BOOTSTRAP_API_KEY=API_KEY,
            ALIGN_DISPATCHER_POLL_SECONDS="0.5",
            ALIGN_READY_PROBE_SECONDS="1",
            OMP_NUM_THREADS="1",
        )
        self.log_path = self.root / "serve.log"
        self.root.mkdir(parents=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", "--ray-cpus", "1"], env=env, cwd=REPO,
                stdout=log, stderr=subprocess.STDOUT,
            )
        self.client = Client(f"http://127.0.0.1:{self.port}", API_KEY)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        assert self.process.poll() is None, f"align serve exited:\n{self.log()[-3000:]}"
        return self.client.ready()

    @property
    def gcs_address(self) -> str:
        return re.search(r"GCS at (\S+)", self.log()).group(1)

    @property
    def jobs_api(self) -> str:
        return re.search(r"jobs API at (http://\S+),", self.log()).group(1)

    def wait_stopped(self) -> None:
        self.client.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def two_services(tmp_path_factory, small_model, small_data):
    root = tmp_path_factory.mktemp("two-services")
    services = [Service(root, name, small_model, small_data) for name in ("a", "b")]
    try:
        deadline = time.monotonic() + 120
        while not all(service.ready() for service in services):
            assert time.monotonic() < deadline, "\n".join(s.log()[-2000:] for s in services)
            time.sleep(0.5)
        yield services
    finally:
        for service in services:  # both at once: each waits for its own Ray to stop
            service.process.terminate()
        for service in services:
            service.wait_stopped()
    deadline = time.monotonic() + 30
    while left := [p for service in services for p in _ray_processes_of(service)]:
        assert time.monotonic() < deadline, f"stopping align serve stops its Ray: {[p.info['cmdline'] for p in left]}"
        time.sleep(0.5)


def _ray_processes_of(service: Service) -> list[psutil.Process]:
    from services.local_ray import temp_dir_for

    temp_dir = str(temp_dir_for(service.home))
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_each_service_runs_its_stages_on_its_own_ray(two_services, small_model, small_data):
    first, second = two_services
    assert first.gcs_address != second.gcs_address
    stage = {"type": "sft", "data": {"path": str(small_data["sft"]), "eval_fraction": 0.0}, "batch_size": 2,
             "max_steps": 2, "lr": 1e-3, "seed": 7, "checkpoint_every": 100, "max_length": 64}
    spec = job_spec(small_model, [stage], name="two", deepspeed={"zero_stage": 0, "precision": "fp32"})
    jobs = [service.client.submit(spec) for service in two_services]  # both run at the same time
    for service, job in zip(two_services, jobs, strict=True):
        job = wait_until(service.client, job["id"], finished, 240)
        assert job["status"] == "succeeded", service.log()[-3000:]
        messages = [e["payload"]["text"] for e in service.client.events(job["id"], type="message", limit=100)["data"]]
        placed = next(m for m in messages if m.startswith("ranks placed: "))
        (rank,) = json.loads(placed.removeprefix("ranks placed: "))
        assert rank["cluster"] == service.gcs_address, f"the stage ran on {rank['cluster']}"
        service.node_id = rank["node_id"]
        submission = f"align-{job['stages'][0]['id']}-a1"
        other = second if service is first else first
        assert _submission_status(service.jobs_api, submission) == "SUCCEEDED"
        assert _submission_status(other.jobs_api, submission) is None
    assert first.node_id != second.node_id


def _submission_status(jobs_api: str, submission_id: str) -> str | None:
    response = httpx.get(f"{jobs_api}/api/jobs/{submission_id}", timeout=10)
    return response.json()["status"] if response.status_code == 200 else None


def test_readyz_fails_when_its_ray_cannot_accept_a_job(two_services):
    """The first service's raylet dies (its whole head goes down with it): that service turns unready
    with a one-line reason, the other one stays ready."""
    first, second = two_services
    assert first.client.ready() and second.client.ready()
    raylets = [p for p in _ray_processes_of(first) if p.info["cmdline"][0].endswith("/raylet")]
    assert len(raylets) == 1, "found the first service's raylet"
    raylets[0].kill()
    deadline = time.monotonic() + 30
    while (response := httpx.get(f"http://127.0.0.1:{first.port}/readyz", timeout=60)).status_code == 200:
        assert time.monotonic() < deadline, "the first service stayed ready"
        time.sleep(0.5)
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert checks["database"] == "ok" and checks["ray"].startswith("cannot accept a job: ")
    assert "\n" not in checks["ray"] and len(checks["ray"]) <= 300
    assert httpx.get(f"http://127.0.0.1:{second.port}/readyz", timeout=60).status_code == 200
    # Ray workers of a SIGKILLed raylet notice only after ~20 s, and each has a process group of its own
    # (stopping the service ends only its head's group): end the ones this test orphaned.
    for orphan in _ray_processes_of(first):
        orphan.kill()
