"""deploy/compose.yaml, run as it is written, without Docker (tests/deploy/compose_local.py says how).

The stack's own commands and variables, with deploy/.env.example as its `.env`: migrate runs to completion
against a fresh database on the machine's Postgres, then the Ray head, the API and two dispatchers start in
`depends_on` order, each once its health check passes. A one-stage SFT job POSTed to the API trains on the
Ray head and publishes its artifact into the stack's data volume.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from compose_local import ComposeStack
from databases import create_postgres_database, drop_postgres_database
from deploy_files import (
    DEPLOY,
    REPO,
    check_ray_start,
    dockerfile_instructions,
    image_env,
    resolve_align_command,
)

from align.client import Client
from align.ports import free_port

COMPOSE = DEPLOY / "compose.yaml"
PATH_SETTINGS = {"ALIGN_CACHE_DIR", "ALIGN_HOME"}  # read by align.paths, not by Settings
COMPOSE_ONLY = {"ALIGN_IMAGE", "ALIGN_API_PORT"}  # interpolated into compose.yaml, not read by align


def test_every_align_variable_is_a_setting_and_every_command_is_real():
    from dotenv import dotenv_values

    from services.routes.health import router
    from services.settings import Settings

    settings = {f"ALIGN_{name.upper()}" for name in Settings.model_fields} | PATH_SETTINGS
    spec = yaml.safe_load(COMPOSE.read_text())
    names = set(dotenv_values(DEPLOY / ".env.example")) - COMPOSE_ONLY
    for name, service in spec["services"].items():
        names |= set(service.get("environment", {}))
        command = service.get("command")
        words = command.split() if isinstance(command, str) else command or []
        if words[:1] == ["align"]:
            assert resolve_align_command(words[1:]), name
        elif words[:2] == ["ray", "start"]:
            check_ray_start(words[2:])
        for url in re.findall(r"http://127\.0\.0\.1:8321(/\w+)", str(service.get("healthcheck", {}))):
            assert url in {route.path for route in router.routes}, f"{name}: no route {url}"
    assert {n for n in names if n.startswith("ALIGN_")} <= settings
    assert {"ALIGN_REPORT_SECRET", "ALIGN_BOOTSTRAP_API_KEY", "POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"} <= set(
        dotenv_values(DEPLOY / ".env.example")), "every secret comes from the env file"
    conditions = {d: c["condition"] for d, c in spec["services"]["api"]["depends_on"].items()}
    assert conditions == {"migrate": "service_completed_successfully"}


def test_no_service_inherits_the_apis_health_check():
    """The image's HEALTHCHECK probes the API's port: every other long-running service of the image sets a
    check of its own (its own port) or turns it off, or Docker reports it unhealthy for good."""
    spec = yaml.safe_load(COMPOSE.read_text())
    for name, service in spec["services"].items():
        if service.get("image", "").startswith("postgres") or service.get("restart") == "no":
            continue
        check = service.get("healthcheck")
        assert check, f"{name} would inherit the image's check of the API"
        if check.get("disable"):
            continue
        ports = re.findall(r"127\.0\.0\.1:(\d+)/", str(check["test"]))
        command = service["command"] if isinstance(service["command"], str) else " ".join(service["command"])
        assert ports and all(p in command or p in str(service.get("environment", {})) or p in str(
            service.get("expose", [])) for p in ports), f"{name}: its check probes a port it does not serve"


@pytest.mark.slow


def test_compose_stack_runs_a_job(tmp_path, small_model, small_data):
    spec = yaml.safe_load(COMPOSE.read_text())
    assert set(spec["services"]) == {"postgres", "migrate", "ray-head", "api", "dispatcher", "ray-worker"}
    ports = {(name, int(port)): free_port() for name, service in spec["services"].items()
             for port in service.get("expose", []) if name != "postgres"}
    ports[("postgres", 5432)] = int(os.environ.get("ALIGN_TEST_POSTGRES_PORT", "5432"))
    data = tmp_path / "align-data"
    volumes = {"align-data": data, "postgres-data": tmp_path / "postgres-data",
               "align-cache": Path(os.environ["ALIGN_CACHE_DIR"])}  # the machine's built tiny model and ops
    shutil.copytree(small_model, data / "models" / "small")
    (data / "datasets").mkdir(parents=True)
    shutil.copy(small_data["sft"], data / "datasets" / "sft.jsonl")

    database_url = create_postgres_database("align_compose")
    stack = ComposeStack(
        compose_file=COMPOSE, env_file=DEPLOY / ".env.example", root=tmp_path,
        image_env=image_env(dockerfile_instructions(DEPLOY / "Dockerfile")),
        volumes=volumes, ports=ports, external={"postgres"},
        # As `POSTGRES_USER=... POSTGRES_DB=... docker compose up` would: the machine's server and a fresh database.
        overrides={"POSTGRES_USER": "postgres", "POSTGRES_DB": database_url.rsplit("/", 1)[1]},
        # The image's installed align is this checkout; its interpreter is this one.
        path=str(Path(sys.executable).parent), extra_env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                          # stop at once at the end, no 30 s drain
                                                          "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    started = time.monotonic()
    try:
        assert stack.start_order().index("migrate") < min(
            stack.start_order().index(s) for s in ("ray-head", "api", "dispatcher"))
        assert "ray-worker" not in stack.services, "the GPU worker is in a profile of its own"
        timings = stack.up()
        api_env = stack.environment("api")
        assert api_env["ALIGN_DATABASE_URL"] == database_url.replace("postgres@", "postgres:" + stack.variables[
            "POSTGRES_PASSWORD"] + "@")

        jobs_api = f"http://127.0.0.1:{ports[('ray-head', 8265)]}"
        refused = httpx.get(f"{jobs_api}/api/jobs/", timeout=10)
        assert refused.status_code in (401, 403), "Ray's Jobs API refuses a client without RAY_AUTH_TOKEN"

        client = Client(f"http://127.0.0.1:{ports[('api', 8321)]}", api_env["ALIGN_BOOTSTRAP_API_KEY"])
        job = client.submit({
            "name": "compose", "base_model": stack.local("api", "/data/models/small"),
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"zero_stage": 0, "precision": "fp32"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "stages": [{"type": "sft", "data": {"path": stack.local("api", "/data/datasets/sft.jsonl")},
                        "batch_size": 4, "max_steps": 1, "lr": 1e-3, "seed": 7}],
        })
        deadline = time.monotonic() + 300
        while client.job(job["id"])["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, "the job did not finish in 300 s"
            time.sleep(1)
        job = client.job(job["id"])
        logs = "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in stack.processes)
        assert job["status"] == "succeeded", f"{job}\n{logs}"

        artifact = client.artifact(job["stages"][0]["artifact_id"])
        folder = Path(artifact["uri"].removeprefix("file://"))
        assert folder.is_relative_to(data / "artifacts"), "artifacts land in the stack's data volume"
        assert (folder / "manifest.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert artifact["metrics"], "the stage reported its final metrics"

        dispatchers = [p for p in stack.processes if p.service == "dispatcher"]
        assert len(dispatchers) == 2
        for dispatcher in dispatchers:
            assert dispatcher.popen.poll() is None, dispatcher.output()
            assert f"on {jobs_api}" in dispatcher.output()
        client.close()
        print(f"compose stack: ready in {timings} s, job done {time.monotonic() - started:.0f} s after start")
    finally:
        stack.down()
        drop_postgres_database(database_url)
    for service, tmp in stack.tmp_dirs.items():
        assert not list(_processes_under(tmp)), f"{service} left processes behind"


def _processes_under(tmp: Path):
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(str(tmp) in arg for arg in process.info["cmdline"] or []):
            yield process
