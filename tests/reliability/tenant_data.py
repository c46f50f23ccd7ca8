"""Two tenants and one job of the first, made with the database helpers (no training): a claimed stage run
with a heartbeat, a metrics record, and a published artifact in the store with its row."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from align.artifacts import ArtifactStore
from align.spec import parse_spec
from services.db import artifacts, auth, jobs, reports, transitions
from services.settings import Settings

REPORT_SECRET = "tenant-tests-report-secret"


def make_settings(root: Path, database_url: str, **overrides) -> Settings:
    data = root / "data"
    data.mkdir(exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]
    (data / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sft = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(4)]
    (data / "sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in sft))
    values = {"database_url": database_url, "artifact_root": str(root / "artifacts"),
              "work_root": str(root / "work"), "data_roots": [str(data)], "model_roots": [str(root / "models")],
              "report_secret": REPORT_SECRET, "run_dispatcher": False}
    return Settings(**{**values, **overrides})


def job_spec(settings: Settings, name: str = "demo") -> dict:
    data = Path(settings.data_roots[0])
    return {"name": name, "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 2},
                       {"type": "dpo", "data": {"path": str(data / "prefs.jsonl")}, "max_steps": 2}]}


def new_key(session_factory, tenant_name: str) -> tuple[str, str]:
    """(tenant id, plaintext key) of a new tenant."""
    with session_factory.begin() as session:
        tenant = auth.create_tenant(session, tenant_name)
        _, plaintext = auth.create_api_key(session, tenant.id, "test")
        return tenant.id, plaintext


@dataclass
class SeededJob:
    job_id: str
    stage_run_id: str
    attempt: int
    artifact_id: str
    files: dict[str, str]
    """The artifact's files: path -> sha256."""


def seed_job(session_factory, settings: Settings, tenant_id: str) -> SeededJob:
    """A queued job of ``tenant_id`` whose first stage is claimed and running, has reported a heartbeat and
    a metrics record, and has published an adapter (files in the store, row in the database)."""
    spec = parse_spec(job_spec(settings))
    with session_factory.begin() as session:
        job, _ = jobs.create_job(session, tenant_id, spec, None, spec.hash(), max_attempts=settings.max_attempts)
        job_id = job.id
    with session_factory.begin() as session:
        run = transitions.claim_next(session, "tenant-tests", settings.lease_seconds)
        stage_run_id, attempt = run.id, run.attempt
    folder = Path(settings.work_root) / "adapter"
    (folder / "weights").mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "weights" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    published = ArtifactStore(settings.artifact_root).publish(
        folder, lineage="demo.sft", kind="adapter", stage={"type": "sft", "index": 0, "name": "sft"},
        base_model="builtin:tiny", spec_hash=spec.hash(), job={"id": job_id, "name": "demo"},
    )
    manifest = Path(settings.artifact_root) / "demo.sft" / "v1" / "manifest.json"
    payload = {"artifact_id": published.artifact_id, "uri": published.uri, "lineage": "demo.sft", "version": 1,
               "kind": "adapter", "manifest_hash": "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest(),
               "parents": [], "metrics": {"loss": 0.5}}
    with session_factory.begin() as session:
        lease = settings.lease_seconds
        assert reports.apply_report(session, stage_run_id, attempt, "heartbeat", {"step": 1, "total_steps": 2},
                                    lease_seconds=lease)
        assert reports.apply_report(session, stage_run_id, attempt, "metrics", {"step": 1, "loss": 0.7},
                                    lease_seconds=lease)
        artifacts.record_artifact(session, job_id, stage_run_id, attempt, payload)
    files = {path: entry["sha256"] for path, entry in published.manifest.files.items()}
    return SeededJob(job_id, stage_run_id, attempt, published.artifact_id, files)
