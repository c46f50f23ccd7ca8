"""The API on SQLite and Postgres: ``base_model: artifact:<id>`` checked at POST /jobs and carried into the
stage's launch, and ``GET /artifacts/{id}/export`` serving the merged model folder as a tar archive."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from helpers import prompt_logits
from peft import PeftModel
from sqlalchemy import select
from transformers import AutoModelForCausalLM

from align.artifacts import ArtifactStore
from align.models.load import load_tokenizer
from services.app import create_app
from services.db import auth, transitions
from services.db.models import Tenant
from services.dispatcher import Dispatcher
from services.settings import Settings

SECRET = "test-report-secret"


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def settings(tmp_path, database_url, data_dir, chain):
    return Settings(database_url=database_url, artifact_root=chain.root, work_root=str(tmp_path / "work"),
                    data_roots=[str(data_dir)], model_roots=[str(tmp_path / "models")],
                    bootstrap_api_key="bootstrap-key", report_secret=SECRET, run_dispatcher=False)


@pytest.fixture
def client(settings, session_factory):
    with TestClient(create_app(settings, session_factory=session_factory)) as test_client:
        yield test_client


def _key_for(session_factory, tenant_name: str) -> dict[str, str]:
    with session_factory() as session:
        tenant = auth.create_tenant(session, tenant_name)
        _, plaintext = auth.create_api_key(session, tenant.id, "test")
        session.commit()
    return {"Authorization": f"Bearer {plaintext}"}


def _spec(data_dir, name: str, base_model: str = "builtin:tiny") -> dict:
    return {"name": name, "base_model": base_model,
            "stages": [{"type": "sft", "data": {"path": str(data_dir / "sft.jsonl")}, "max_steps": 1}]}


def _post(client, headers, spec):
    return client.post("/jobs", json=spec, headers=headers)


def _record(client, session_factory, artifacts: list[tuple[str, str, str]], headers=None, data_dir=None) -> None:
    """Claim the oldest queued stage and report ``(id, kind, uri)`` artifacts for it (database rows), one stage
    run each: a stage attempt records one artifact, so each artifact after the first comes from a job of its own
    POSTed with ``headers``."""
    for number, (artifact_id, kind, uri) in enumerate(artifacts):
        if number:
            assert _post(client, headers, _spec(data_dir, f"extra-{number}")).status_code == 201
        with session_factory() as session:
            run = transitions.claim_next(session, "test-owner", 300)
            session.commit()
            run_id, attempt = run.id, run.attempt
        token = Settings(report_secret=SECRET).report_token(run_id, attempt)
        manifest = Path(uri) / "manifest.json"
        manifest_hash = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else "0" * 64
        payload = {"artifact_id": artifact_id, "uri": uri, "lineage": artifact_id.split("-v")[0], "version": 1,
                   "kind": kind, "manifest_hash": "sha256:" + manifest_hash, "parents": [], "metrics": {}}
        body = {"stage_run_id": run_id, "attempt": attempt, "type": "artifact", "payload": payload}
        response = client.post("/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text


def _fake_reward_model(root: str, tmp_path: Path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4, "task_type": "SEQ_CLS"}')
    return ArtifactStore(root).publish(folder, lineage="first.rm", kind="reward_model",
                                       stage={"type": "rm", "index": 1, "name": "rm"}, base_model="builtin:tiny",
                                       spec_hash="sha256:0", job={"id": None, "name": "first"})


def test_post_checks_the_base_model_artifact(client, session_factory, settings, data_dir, chain, tmp_path):
    """Missing, another tenant's and a reward model are each a 422 on base_model; the caller's policy is
    accepted, and the first stage's launch starts from it with it as the parent."""
    alice, bob = _key_for(session_factory, "alice"), _key_for(session_factory, "bob")
    assert _post(client, alice, _spec(data_dir, "first")).status_code == 201
    reward_model = _fake_reward_model(chain.root, tmp_path)
    sft_id = chain.sft.artifact.artifact_id
    _record(client, session_factory, [(sft_id, "adapter", chain.sft.artifact.uri),
                                      (reward_model.artifact_id, "reward_model", reward_model.uri)],
            headers=alice, data_dir=data_dir)

    def refused(base_model: str, headers=alice) -> dict[str, str]:
        response = _post(client, headers, _spec(data_dir, "next", f"artifact:{base_model}"))
        assert response.status_code == 422, response.text
        return {item["field"]: item["message"] for item in response.json()["detail"]}

    missing = refused("first.sft-v9-0123456789ab")
    assert missing == {"base_model": "no artifact 'first.sft-v9-0123456789ab'; give artifact:<id> of a policy "
                                     "that a stage of one of your jobs published"}
    assert refused(sft_id, headers=bob) == {"base_model": missing["base_model"].replace(
        "first.sft-v9-0123456789ab", sft_id)}
    assert refused(reward_model.artifact_id)["base_model"].startswith(
        f"'{reward_model.artifact_id}' is an artifact of kind 'reward_model', not a policy; give artifact:<id>")

    created = _post(client, alice, _spec(data_dir, "next", f"artifact:{sft_id}"))
    assert created.status_code == 201, created.text
    with session_factory() as session:
        run = transitions.claim_next(session, "test-owner", 300)
        assert run.job_id == created.json()["id"]
        launch = Dispatcher(settings, session_factory, None).launch(session, run)
    assert launch.start_policy == chain.sft.artifact.uri
    assert launch.parents == [sft_id]


def test_export_serves_the_merged_model_to_its_owner(client, session_factory, data_dir, chain, small_model, tmp_path):
    alice, bob = _key_for(session_factory, "alice"), _key_for(session_factory, "bob")
    assert _post(client, alice, _spec(data_dir, "second")).status_code == 201
    dpo_id = chain.dpo.artifact.artifact_id
    reward_model = _fake_reward_model(chain.root, tmp_path)
    _record(client, session_factory, [(dpo_id, "adapter", chain.dpo.artifact.uri),
                                      (reward_model.artifact_id, "reward_model", reward_model.uri)],
            headers=alice, data_dir=data_dir)

    response = client.get(f"/artifacts/{dpo_id}/export", headers=alice)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    assert f'filename="{dpo_id}.tar"' in response.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / dpo_id
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "README.md"} <= {
        p.name for p in folder.iterdir()}
    exported = prompt_logits(AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_model), chain.dpo.artifact.uri)
    reference = prompt_logits(peft.eval(), load_tokenizer(small_model))
    assert (exported - reference).abs().max() <= 1e-4
    # The archive is built once and served again as it is.
    assert client.get(f"/artifacts/{dpo_id}/export", headers=alice).content == response.content

    assert client.get(f"/artifacts/{dpo_id}/export", headers=bob).status_code == 404
    assert client.get("/artifacts/second.dpo-v9-0123456789ab/export", headers=alice).status_code == 404
    refused = client.get(f"/artifacts/{reward_model.artifact_id}/export", headers=alice)
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["field"] == "artifact_id"
    assert "is a reward model" in refused.json()["detail"][0]["message"]


def test_export_holds_no_database_transaction_while_it_builds(client, session_factory, data_dir, chain, monkeypatch):
    """The build loads and merges a model (minutes for a large one). Meanwhile the request holds no database
    connection, so workers' reports and other requests write at once (on SQLite a transaction holds the
    database's write lock)."""
    import align.export

    alice = _key_for(session_factory, "alice")
    assert _post(client, alice, _spec(data_dir, "second")).status_code == 201
    sft_id = chain.sft.artifact.artifact_id
    _record(client, session_factory, [(sft_id, "adapter", chain.sft.artifact.uri)])
    engine = session_factory.kw["bind"]
    build = align.export.export_archive
    seen = {}

    def build_while_writing(*args, **kwargs):
        seen["connections"] = engine.pool.checkedout()
        if seen["connections"] == 0:
            with session_factory() as other:
                auth.create_tenant(other, "carol")
                other.commit()
        return build(*args, **kwargs)

    monkeypatch.setattr(align.export, "export_archive", build_while_writing)
    response = client.get(f"/artifacts/{sft_id}/export", headers=alice)
    assert response.status_code == 200, response.text
    assert seen == {"connections": 0}
    with session_factory() as session:
        assert session.scalar(select(Tenant.name).where(Tenant.name == "carol")) == "carol"


def test_post_looks_artifacts_up_after_reading_the_data(client, session_factory, data_dir, chain, monkeypatch):
    """POST /jobs reads and renders every data file (seconds for a large one) before it looks the
    ``artifact:<id>`` base model up, so no transaction (on SQLite, the write lock) is held while it reads."""
    import services.paths

    alice = _key_for(session_factory, "alice")
    assert _post(client, alice, _spec(data_dir, "first")).status_code == 201
    sft_id = chain.sft.artifact.artifact_id
    _record(client, session_factory, [(sft_id, "adapter", chain.sft.artifact.uri)])
    engine = session_factory.kw["bind"]
    read_data, connections = services.paths.job_problems, []

    def counted_read(*args, **kwargs):
        connections.append(engine.pool.checkedout())
        return read_data(*args, **kwargs)

    monkeypatch.setattr(services.paths, "job_problems", counted_read)
    assert _post(client, alice, _spec(data_dir, "next", f"artifact:{sft_id}")).status_code == 201
    assert connections == [0]
