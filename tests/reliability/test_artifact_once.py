"""An attempt that publishes again (its artifact report was lost, it ran again) leaves one version in the
store and one artifact row, never an orphan beside a duplicate; another attempt publishes a new version."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from align.artifacts import ArtifactStore
from services.app import create_app
from services.db import auth, transitions
from services.db.artifacts import record_artifact
from services.db.models import Artifact
from services.settings import Settings
from workers.report import manifest_hash

SECRET = "artifact-once-secret"


def publish(store: ArtifactStore, out_dir, stage_run_id: str, attempt: int):
    stage = {"type": "sft", "index": 0, "name": "sft", "stage_run_id": stage_run_id, "attempt": attempt}
    return store.publish(out_dir, lineage="once.sft", kind="adapter", stage=stage, base_model="builtin:tiny",
                         spec_hash="sha256:spec", metrics={"loss": 0.5})


def stage_output(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (out_dir / "adapter_config.json").write_text('{"r": 8}')
    return out_dir


def test_publishing_twice_for_one_attempt_gives_one_version(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    out_dir = stage_output(tmp_path)
    first = publish(store, out_dir, "sr_1", 1)
    (out_dir / "adapter_model.safetensors").write_bytes(b"retrained" * 100)  # the attempt ran again
    again = publish(store, out_dir, "sr_1", 1)
    assert (again.uri, again.manifest.artifact_id) == (first.uri, first.manifest.artifact_id)
    assert store.list_versions("once.sft") == [1]
    assert (tmp_path / "artifacts" / "once.sft" / "v1" / "adapter_model.safetensors").read_bytes() == b"weights" * 100
    store.verify(first.uri)

    next_attempt = publish(store, out_dir, "sr_1", 2)
    other_run = publish(store, out_dir, "sr_2", 1)
    assert (next_attempt.manifest.version, other_run.manifest.version) == (2, 3)
    assert next_attempt.manifest.stage["attempt"] == 2 and store.list_versions("once.sft") == [1, 2, 3]


def test_the_artifact_record_is_one_row_per_attempt(tmp_path, database_url, session_factory):
    data = tmp_path / "data"
    data.mkdir()
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 4)
    settings = Settings(database_url=database_url, artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), data_roots=[str(data)], model_roots=[str(data)],
                        report_secret=SECRET, run_dispatcher=False)
    store = ArtifactStore(settings.artifact_root)
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        with session_factory() as session:
            tenant = auth.create_tenant(session, "alice")
            _, key = auth.create_api_key(session, tenant.id, "test")
            session.commit()
        client.headers["Authorization"] = f"Bearer {key}"
        spec = {"name": "once", "base_model": "builtin:tiny",
                "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 2}]}
        job = client.post("/jobs", json=spec).json()
        with session_factory() as session:
            run = transitions.claim_next(session, "test-owner", 300)
            session.commit()
        token = settings.report_token(run.id, run.attempt)

        def report_artifact(published):
            manifest = published.manifest
            payload = {"artifact_id": manifest.artifact_id, "uri": published.uri, "lineage": manifest.lineage,
                       "version": manifest.version, "kind": manifest.kind,
                       "manifest_hash": manifest_hash(store, published.uri), "parents": [], "metrics": {}}
            body = {"stage_run_id": run.id, "attempt": run.attempt, "type": "artifact", "payload": payload}
            answer = client.post("/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text

        out_dir = stage_output(tmp_path)
        first = publish(store, out_dir, run.id, run.attempt)
        report_artifact(first)
        report_artifact(publish(store, out_dir, run.id, run.attempt))  # the attempt ran again
        # An older worker that published a second version for the same attempt: the first row stands.
        stray = store.publish(out_dir, lineage="once.sft", kind="adapter", stage={"type": "sft", "index": 0,
                              "name": "sft"}, base_model="builtin:tiny", spec_hash="sha256:spec")
        report_artifact(stray)
        assert client.get(f"/jobs/{job['id']}").json()["stages"][0]["artifact_id"] == first.manifest.artifact_id

    with session_factory() as session:
        rows = session.query(Artifact).all()
        assert [(row.id, row.stage_run_id, row.attempt) for row in rows] == [
            (first.manifest.artifact_id, run.id, run.attempt)]
        again = record_artifact(session, job["id"], run.id, run.attempt, {"artifact_id": "other", "lineage": "x"})
        assert again.id == first.manifest.artifact_id
        retried = publish(store, out_dir, run.id, run.attempt + 1)
        payload = {"artifact_id": retried.manifest.artifact_id, "uri": retried.uri, "lineage": "once.sft",
                   "version": retried.manifest.version, "kind": "adapter", "manifest_hash": "sha256:00"}
        new_row = record_artifact(session, job["id"], run.id, run.attempt + 1, payload)
        session.commit()
        assert (new_row.id, new_row.version) == (retried.manifest.artifact_id, 3)
        assert session.query(Artifact).count() == 2
