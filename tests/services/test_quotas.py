"""Tenant quotas on SQLite and Postgres: a stage over its tenant's running-stage, GPU or storage quota waits
in `queued` with the reason (in the API and the events) and starts when the quota frees; a stage that could
never fit is refused at POST; `align tenants quota` sets them."""

from __future__ import annotations

import test_dispatcher
from fastapi.testclient import TestClient
from test_dispatcher import FakeRay, new_job, publish, stage_runs
from typer.testing import CliRunner

from services.app import create_app
from services.cli import app
from services.db import auth, events, quotas
from services.db.models import Tenant
from services.dispatcher import Dispatcher
from services.schemas import StageRunPublic

settings, tenant_id = test_dispatcher.settings, test_dispatcher.tenant_id  # the dispatcher tests' fixtures
SFT = [{"type": "sft", "data": {"path": "data/sft.jsonl"}}]


def set_quota(session_factory, tenant_id, **quota) -> None:
    with session_factory.begin() as s:
        tenant = s.get(Tenant, tenant_id)
        for name, value in quota.items():
            setattr(tenant, name, value)


def state_and_reason(session_factory, job_id) -> tuple[str, str | None]:
    (run,) = stage_runs(session_factory, job_id)
    return run.state, StageRunPublic.from_row(run).queued_reason


def test_running_stages_quota_holds_the_next_stage_until_one_ends(settings, session_factory, tenant_id):
    ray = FakeRay()
    dispatcher = Dispatcher(settings, session_factory, ray, owner_id="d1")
    set_quota(session_factory, tenant_id, max_running_stages=1)
    first, second = new_job(session_factory, tenant_id, SFT), new_job(session_factory, tenant_id, SFT)
    with session_factory.begin() as s:
        other_tenant = auth.create_tenant(s, "globex").id
    other = new_job(session_factory, other_tenant, SFT)
    dispatcher.tick()
    assert state_and_reason(session_factory, first) == ("running", None)
    reason = ("tenant acme runs 1 stage(s) at once, its max_running_stages (1); this one starts when one of "
              "them ends")
    assert state_and_reason(session_factory, second) == ("queued", reason)
    assert state_and_reason(session_factory, other)[0] == "running", "another tenant's quota is its own"
    dispatcher.tick()
    with session_factory() as s:
        waits = [e.payload["text"] for e in events.list_events(s, second, type="message")]
    assert waits == [f"waiting: {reason}"], "the reason is said once, not on every pass"

    ticket = ray.ticket(0)
    publish(session_factory, ticket, "sft")
    ray.status[f"align-{ticket['stage_run_id']}-a1"] = "SUCCEEDED"
    dispatcher.tick()
    assert state_and_reason(session_factory, first) == ("succeeded", None)
    assert state_and_reason(session_factory, second) == ("running", None)


def test_gpu_and_storage_quotas(settings, session_factory, tenant_id):
    ray = FakeRay()
    dispatcher = Dispatcher(settings, session_factory, ray, owner_id="d1")
    set_quota(session_factory, tenant_id, max_gpus=3)
    four = [{**SFT[0], "resources": {"num_workers": 2, "gpus_per_worker": 1}}]
    two_gpus = new_job(session_factory, tenant_id, four)
    also_two = new_job(session_factory, tenant_id, four)
    cpu_only = new_job(session_factory, tenant_id, SFT)
    dispatcher.tick()
    assert state_and_reason(session_factory, two_gpus) == ("running", None)
    assert state_and_reason(session_factory, also_two) == (
        "queued", "tenant acme's running stages hold 2 of its 3 GPUs (max_gpus) and this stage needs 2; it starts "
                  "when enough are free")
    assert state_and_reason(session_factory, cpu_only) == ("running", None), "a CPU stage needs no GPU quota"
    with session_factory() as s:
        assert quotas.usage(s, tenant_id) == {"running_stages": 2, "gpus": 2.0, "artifact_bytes": 0}

    # Storage: once the tenant's artifacts reach the quota, nothing more of theirs starts.
    set_quota(session_factory, tenant_id, max_gpus=None, max_artifact_bytes=3 * 2**20)
    with session_factory.begin() as s:
        from services.db.artifacts import record_artifact

        ticket = ray.ticket(0)
        record_artifact(s, two_gpus, ticket["stage_run_id"], 1, {
            "artifact_id": "demo.sft-v1-000000000001", "uri": "/store/a", "lineage": "demo.sft", "version": 1,
            "kind": "adapter", "manifest_hash": "sha256:" + "0" * 64, "size_bytes": 3 * 2**20})
    dispatcher.tick()
    assert state_and_reason(session_factory, also_two) == (
        "queued", "tenant acme's artifacts take 3.0 MiB, at or over its max_artifact_bytes (3.0 MiB); delete "
                  "artifacts or raise the quota")
    set_quota(session_factory, tenant_id, max_artifact_bytes=None)
    dispatcher.tick()
    assert state_and_reason(session_factory, also_two) == ("running", None)


def test_a_stage_asking_for_more_gpus_than_the_quota_is_refused(settings, session_factory, tenant_id, tmp_path):
    set_quota(session_factory, tenant_id, max_gpus=4)
    with session_factory.begin() as s:
        _, key = auth.create_api_key(s, tenant_id, "test")
    api = settings.model_copy(update={"data_roots": [str(tmp_path)], "model_roots": [str(tmp_path)],
                                      "artifact_root": str(tmp_path / "store"), "work_root": str(tmp_path / "w"),
                                      "run_dispatcher": False})
    spec = {"name": "big", "base_model": "builtin:tiny", "resources": {"num_workers": 8, "gpus_per_worker": 1},
            "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}},
                       {"type": "rm", "data": {"path": "builtin:parity/prefs"},
                        "resources": {"num_workers": 2, "gpus_per_worker": 1}}]}
    with TestClient(create_app(api, session_factory=session_factory)) as client:
        response = client.post("/jobs", json=spec, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 422
    assert response.json()["detail"] == [{"field": "resources", "message": (
        "stage 0 asks for 8 GPUs (num_workers x gpus_per_worker) and tenant acme may hold at most 4 at once "
        "(max_gpus); ask for fewer or have the operator raise the quota")}]


def test_align_tenants_quota(session_factory, tenant_id, database_url, monkeypatch):
    monkeypatch.setenv("ALIGN_DATABASE_URL", database_url)
    runner = CliRunner()
    result = runner.invoke(app, ["tenants", "quota", "acme", "--running-stages", "2", "--gpus", "8",
                                 "--artifact-gib", "0.5"])
    assert result.exit_code == 0, result.output
    assert "2 running stages, 8 GPUs, 0.5 GiB of artifacts" in result.output
    with session_factory() as s:
        tenant = s.get(Tenant, tenant_id)
        assert (tenant.max_running_stages, tenant.max_gpus, tenant.max_artifact_bytes) == (2, 8.0, 2**29)
    assert "2 running stages" in runner.invoke(app, ["tenants", "list"]).output
    assert runner.invoke(app, ["tenants", "quota", "acme", "--clear"]).exit_code == 0
    with session_factory() as s:
        assert s.get(Tenant, tenant_id).max_gpus is None
    missing = runner.invoke(app, ["tenants", "quota", "initech", "--gpus", "1"])
    assert missing.exit_code == 1 and "no tenant 'initech'" in missing.output
