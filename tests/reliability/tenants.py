"""A service with two tenants, alice and bob, each reading only its own folders (``{tenant}`` roots), and
helpers to give alice data, model folders and recorded artifacts (shared by the tenant-file and model-file
trials)."""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from fastapi.testclient import TestClient

from align.artifacts import ArtifactStore
from services.app import create_app
from services.db import auth, transitions
from services.settings import Settings

SECRET = "test-report-secret"
TENANTS = ("alice", "bob")
SFT_ROW = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def safetensors_bytes(**tensors: bytes) -> bytes:
    """A valid safetensors file holding each named byte string as a 1-D ``U8`` tensor."""
    header, offset = {}, 0
    for name, data in tensors.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the header is padded to 8 bytes, as safetensors writes it
    return struct.pack("<Q", len(text)) + text + b"".join(tensors.values())


def model_folder(folder: Path, files: dict[str, bytes | str]) -> Path:
    """A Hugging Face model folder: ``config.json`` plus ``files`` (name -> content)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, content in files.items():
        target = folder / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return folder


@contextmanager
def two_tenant_service(tmp_path: Path, database_url: str, session_factory, **overrides):
    """The API on ``{tenant}`` roots: ``data/<tenant>`` and ``models/<tenant>`` under ``tmp_path``, artifacts
    and checkpoints beside them. Yields ``client``, ``headers[tenant]``, ``data[tenant]``, ``models[tenant]``,
    ``settings`` and ``store``."""
    data = {name: tmp_path / "data" / name for name in TENANTS}
    models = {name: tmp_path / "models" / name for name in TENANTS}
    for folder in (*data.values(), *models.values()):
        folder.mkdir(parents=True)
    for folder in data.values():
        (folder / "sft.jsonl").write_text((json.dumps(SFT_ROW) + "\n") * 4)
    settings = Settings(**{
        "database_url": database_url, "artifact_root": str(tmp_path / "artifacts"),
        "work_root": str(tmp_path / "work"), "data_roots": [str(tmp_path / "data" / "{tenant}")],
        "model_roots": [str(tmp_path / "models" / "{tenant}")], "report_secret": SECRET, "run_dispatcher": False,
        **overrides,
    })
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        headers = {}
        with session_factory() as session:
            for name in TENANTS:
                tenant = auth.create_tenant(session, name)
                _, key = auth.create_api_key(session, tenant.id, "test")
                headers[name] = {"Authorization": f"Bearer {key}"}
            session.commit()
        yield SimpleNamespace(client=client, headers=headers, data=data, models=models, settings=settings,
                              store=ArtifactStore(settings.artifact_root))


def job_spec(data_path: str, base_model: str = "builtin:tiny", name: str = "job", **stage) -> dict:
    return {"name": name, "base_model": base_model,
            "stages": [{"type": "sft", "data": {"path": data_path}, "max_steps": 2, **stage}]}


def record_artifact(service, tenant: str, folder: Path, *, lineage: str, kind: str = "adapter") -> str:
    """Publish ``folder`` to the store as the artifact of a new job of ``tenant`` and record it as its worker
    would (claim the stage, report the artifact); returns the artifact id."""
    client = service.client
    spec = job_spec(str(service.data[tenant] / "sft.jsonl"), name=lineage.split(".")[0])
    job = client.post("/jobs", json=spec, headers=service.headers[tenant])
    assert job.status_code == 201, job.text
    session_factory = client.app.state.session_factory
    with session_factory() as session:
        run = transitions.claim_next(session, "test-owner", 300)
        session.commit()
        stage_run_id, attempt = run.id, run.attempt
    published = service.store.publish(
        folder, lineage=lineage, kind=kind, stage={"type": "sft", "index": 0, "name": "sft"},
        base_model="builtin:tiny", spec_hash="sha256:0", job={"id": job.json()["id"], "name": spec["name"]},
    )
    manifest = Path(published.uri) / "manifest.json"
    payload = {"artifact_id": published.artifact_id, "uri": published.uri, "lineage": lineage,
               "version": published.manifest.version, "kind": kind,
               "manifest_hash": "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest(), "parents": []}
    token = Settings(report_secret=SECRET).report_token(stage_run_id, attempt)
    response = client.post("/internal/reports", headers={"Authorization": f"Bearer {token}"},
                           json={"stage_run_id": stage_run_id, "attempt": attempt, "type": "artifact",
                                 "payload": payload})
    assert response.status_code == 200, response.text
    return published.artifact_id


def fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {item["field"]: item["message"] for item in response.json()["detail"]}
