"""The HTTP API against SQLite and Postgres: jobs, events, metrics, artifacts, reports, tenants, errors."""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time

import pytest
from fastapi.testclient import TestClient

from align.artifacts import ArtifactStore
from services.app import create_app
from services.db import auth, jobs, transitions
from services.db.models import Job, StageRun
from services.settings import Settings

SECRET = "test-report-secret"


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    sft = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
           for i in range(4)]
    prefs = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(4)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    no_rejected = json.dumps({"prompt": "q", "chosen": "a"}) + "\n"
    (root / "no-rejected.jsonl").write_text(no_rejected * 2)
    return root


@pytest.fixture
def settings(tmp_path, database_url, data_dir):
    (tmp_path / "models").mkdir()
    return Settings(
        database_url=database_url,
        artifact_root=str(tmp_path / "artifacts"),
        work_root=str(tmp_path / "work"),
        data_roots=[str(data_dir)],
        model_roots=[str(tmp_path / "models")],
        bootstrap_api_key="bootstrap-key",
        report_secret=SECRET,
        run_dispatcher=False,
    )


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


@pytest.fixture
def alice(client, session_factory):
    return _key_for(session_factory, "alice")


@pytest.fixture
def bob(client, session_factory):
    return _key_for(session_factory, "bob")


def make_spec(data_dir, name: str = "demo", **overrides) -> dict:
    spec = {
        "name": name,
        "base_model": "builtin:tiny",
        "stages": [
            {"type": "sft", "data": {"path": str(data_dir / "sft.jsonl")}, "max_steps": 2},
            {"type": "dpo", "data": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 2},
        ],
    }
    spec.update(overrides)
    return spec


def submit(client, headers, spec, **kwargs) -> dict:
    response = client.post("/jobs", json=spec, headers=headers, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


def claim_first_stage(session_factory) -> tuple[str, int]:
    with session_factory() as session:
        run = transitions.claim_next(session, "test-owner", 300)
        session.commit()
        return run.id, run.attempt


def report(client, stage_run_id, attempt, type, payload, token=None):
    token = token or Settings(report_secret=SECRET).report_token(stage_run_id, attempt)
    body = {"stage_run_id": stage_run_id, "attempt": attempt, "type": type, "payload": payload}
    return client.post("/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})


def fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {item["field"]: item["message"] for item in response.json()["detail"]}


def test_api_keys(client, alice):
    assert client.get("/jobs").status_code == 401
    assert "Authorization: Bearer" in client.get("/jobs").json()["detail"]
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer bootstrap-key"}).status_code == 200
    assert client.get("/jobs", headers=alice).json() == {"data": [], "next_cursor": None}


def test_bootstrap_key_survives_a_restart(settings, session_factory, client):
    with TestClient(create_app(settings, session_factory=session_factory)) as again:
        assert again.get("/jobs", headers={"Authorization": "Bearer bootstrap-key"}).status_code == 200
    with session_factory() as session:
        assert auth.tenant_for_key(session, "bootstrap-key").name == "default"


def test_unauthenticated_bad_body_is_401(client):
    assert client.post("/jobs", json={"nonsense": True}).status_code == 401


class FakeRay:
    """Answers the Jobs API calls the dispatcher makes; ``down`` makes every call fail like a dead head."""

    def __init__(self, down: bool = False, refuses_jobs: bool = False):
        self.down, self.refuses_jobs, self.submitted = down, refuses_jobs, {}

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("Ray head at http://127.0.0.1:8265 refused the connection")

    def submit_job(self, *, entrypoint, submission_id, runtime_env, entrypoint_num_cpus=0):
        self._check()
        self.submitted[submission_id] = json.loads(runtime_env["env_vars"]["ALIGN_TICKET"])
        return submission_id

    def get_job_status(self, submission_id):
        self._check()
        return "RUNNING" if submission_id in self.submitted else None

    def stop_job(self, submission_id):
        self._check()
        return True

    def check_submission(self):
        self._check()
        if self.refuses_jobs:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please "
                               "try again later.\nTraceback (most recent call last):\n  ...")

    def get_job_info(self, submission_id):
        return {"status": self.get_job_status(submission_id)}

    def get_job_logs(self, submission_id):
        return ""


def test_health(client, settings, session_factory):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok"}
    with TestClient(create_app(settings, session_factory=session_factory, ray_client=FakeRay(down=True))) as down:
        unready = down.get("/readyz")
    assert unready.status_code == 503
    assert unready.json()["checks"]["database"] == "ok" and "refused" in unready.json()["checks"]["ray"]
    # Status queries answer, but the head cannot start a job: not ready, with Ray's reason on one line.
    refusing = FakeRay(refuses_jobs=True)
    assert refusing.get_job_status("align-anything") is None
    with TestClient(create_app(settings, session_factory=session_factory, ray_client=refusing)) as app:
        refused = app.get("/readyz")
    assert refused.status_code == 503 and refused.json()["checks"]["ray"] == (
        "cannot accept a job: RuntimeError: Request failed with status code 500: No available agent to submit "
        "job, please try again later. ... ..."
    )


def test_app_runs_the_dispatcher_when_asked(settings, session_factory, data_dir):
    ray = FakeRay()
    settings = settings.model_copy(update={"run_dispatcher": True, "dispatcher_poll_seconds": 0.1})
    headers = {"Authorization": "Bearer bootstrap-key"}
    with TestClient(create_app(settings, session_factory=session_factory, ray_client=ray)) as client:
        job = submit(client, headers, make_spec(data_dir))
        deadline = time.monotonic() + 20
        while client.get(f"/jobs/{job['id']}", headers=headers).json()["stages"][0]["state"] != "running":
            assert time.monotonic() < deadline, "the dispatcher never claimed the stage"
            time.sleep(0.1)
    stage_run_id = client.get(f"/jobs/{job['id']}", headers=headers).json()["stages"][0]["id"]
    ticket = ray.submitted[f"align-{stage_run_id}-a1"]
    assert settings.check_report_token(stage_run_id, 1, ticket["report"]["token"]) is None and ticket["index"] == 0
    assert not any(t.name == "align-dispatcher" and t.is_alive() for t in threading.enumerate())


def test_shutdown_stops_the_services_ray_even_after_the_event_listener_failed(settings, session_factory, caplog):
    class OwnRay(FakeRay):
        local, closed = "a local Ray", 0

        def close(self):
            self.closed += 1

    async def broken_listener():
        raise OSError("LISTEN connection lost for good")

    ray = OwnRay()
    app = create_app(settings, session_factory=session_factory, ray_client=ray)
    app.state.event_waker.run = broken_listener
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
    assert ray.closed == 1 and "the event listener had failed" in caplog.text


def test_submit_and_read_a_job(client, alice, data_dir):
    job = submit(client, alice, make_spec(data_dir))
    assert job["id"].startswith("job_") and job["status"] == "queued" and job["name"] == "demo"
    assert [s["state"] for s in job["stages"]] == ["queued", "pending"]
    assert [s["name"] for s in job["stages"]] == ["sft", "dpo"]
    assert job["stages"][0]["progress"] == {"step": None, "total_steps": None}
    assert job["spec"]["stages"][1]["beta"] == 0.1  # stored with defaults filled in
    fetched = client.get(f"/jobs/{job['id']}", headers=alice).json()
    assert fetched == job


def test_list_newest_first_with_cursor_and_filter(client, alice, data_dir):
    ids = [submit(client, alice, make_spec(data_dir, name=f"job{i}"))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=alice)
        body = page.json()
        seen += [job["id"] for job in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    client.post(f"/jobs/{ids[1]}/cancel", headers=alice)
    cancelled = client.get("/jobs", params={"state": "cancelled"}, headers=alice).json()["data"]
    assert [job["id"] for job in cancelled] == [ids[1]]
    assert len(client.get("/jobs", params={"state": "queued"}, headers=alice).json()["data"]) == 4
    assert "state" in fields(client.get("/jobs", params={"state": "bogus"}, headers=alice))
    assert "limit" in fields(client.get("/jobs", params={"limit": 0}, headers=alice))
    for bad in ("job 1", "job/1", "é", "x" * 41):
        assert "cursor" in fields(client.get("/jobs", params={"cursor": bad}, headers=alice)), bad


def test_idempotency_key(client, alice, data_dir):
    spec = make_spec(data_dir)
    first = submit(client, {**alice, "Idempotency-Key": "k1"}, spec)
    again = client.post("/jobs", json=spec, headers={**alice, "Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    other = client.post("/jobs", json=make_spec(data_dir, name="other"), headers={**alice, "Idempotency-Key": "k1"})
    assert "Idempotency-Key" in fields(other)
    assert len(client.get("/jobs", headers=alice).json()["data"]) == 1


def test_cancel(client, alice, data_dir):
    job = submit(client, alice, make_spec(data_dir))
    cancelled = client.post(f"/jobs/{job['id']}/cancel", headers=alice)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert {s["state"] for s in cancelled.json()["stages"]} == {"cancelled"}
    assert client.post(f"/jobs/{job['id']}/cancel", headers=alice).json()["status"] == "cancelled"


def test_events_pages(client, alice, data_dir, session_factory):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    for i in range(3):
        sent = report(client, stage_run_id, attempt, "message", {"level": "info", "text": f"hello {i}"})
        assert sent.status_code == 200
    everything = client.get(f"/jobs/{job['id']}/events", headers=alice).json()["data"]
    assert [e["id"] for e in everything] == sorted(e["id"] for e in everything)
    messages = client.get(f"/jobs/{job['id']}/events", params={"type": "message"}, headers=alice).json()
    assert [e["payload"]["text"] for e in messages["data"]] == ["hello 0", "hello 1", "hello 2"]
    first = client.get(f"/jobs/{job['id']}/events", params={"type": "message", "limit": 2}, headers=alice).json()
    assert len(first["data"]) == 2 and first["next_cursor"] == str(first["data"][-1]["id"])
    rest = client.get(
        f"/jobs/{job['id']}/events", params={"type": "message", "after": first["next_cursor"]}, headers=alice
    ).json()
    assert [e["payload"]["text"] for e in rest["data"]] == ["hello 2"] and rest["next_cursor"] is None
    assert "type" in fields(client.get(f"/jobs/{job['id']}/events", params={"type": "x"}, headers=alice))


def _read_sse(response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_event_stream_follows_the_job_until_it_ends(client, alice, data_dir, session_factory):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    report(client, stage_run_id, attempt, "message", {"level": "info", "text": "before"})
    sample = {"step": 1, "prompt": "q0", "completion": "a0", "score": 0.5}
    assert report(client, stage_run_id, attempt, "samples", {"samples": [sample]}).status_code == 200

    def later() -> None:
        time.sleep(1.0)
        report(client, stage_run_id, attempt, "message", {"level": "info", "text": "live"})
        time.sleep(0.5)
        with session_factory.begin() as session:
            tenant_id = session.get(Job, job["id"]).tenant_id
            jobs.cancel_job(session, tenant_id, job["id"])

    writer = threading.Thread(target=later)
    writer.start()
    headers = {**alice, "Accept": "text/event-stream"}
    with client.stream("GET", f"/jobs/{job['id']}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(response)
    writer.join()
    texts = [payload["payload"]["text"] for name, payload in events if name == "message"]
    assert texts == ["before", "live"]
    assert [payload["payload"] for name, payload in events if name == "samples"] == [{"samples": [sample]}]
    assert events[-1][0] == "end"
    states = [payload["payload"] for name, payload in events if name == "state"]
    assert states and "cancelled" in json.dumps(states[-1])


def test_metrics(client, alice, data_dir, session_factory):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    for step in (1, 2):
        assert report(client, stage_run_id, attempt, "metrics", {"step": step, "loss": 1.0 / step}).status_code == 200
    assert report(client, stage_run_id, attempt, "heartbeat", {"step": 2, "total_steps": 10}).status_code == 200
    metrics = client.get(f"/jobs/{job['id']}/metrics", headers=alice).json()
    assert [m["name"] for m in metrics] == ["sft", "dpo"]
    assert [r["step"] for r in metrics[0]["records"]] == [1, 2] and metrics[0]["records"][1]["loss"] == 0.5
    assert metrics[1]["records"] == []
    stage = client.get(f"/jobs/{job['id']}", headers=alice).json()["stages"][0]
    assert stage["state"] == "running" and stage["attempt"] == 1
    assert stage["progress"] == {"step": 2, "total_steps": 10}


def test_a_samples_report_becomes_an_event(client, alice, data_dir, session_factory):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    with session_factory() as session:
        lease = session.get(StageRun, stage_run_id).lease_expires_at
    samples = [
        {"step": 3, "prompt": "q1", "completion": "a1", "score": 1.25},
        {"step": 3, "prompt": "q2", "completion": "b2", "score": -0.5},
    ]
    assert report(client, stage_run_id, attempt, "samples", {"samples": samples}).json() == {"ok": True}
    page = client.get(f"/jobs/{job['id']}/events", params={"type": "samples"}, headers=alice).json()
    (event,) = page["data"]
    assert (event["type"], event["stage_run_id"], event["attempt"]) == ("samples", stage_run_id, attempt)
    assert event["payload"] == {"samples": samples}
    everything = client.get(f"/jobs/{job['id']}/events", headers=alice).json()["data"]
    assert [e["id"] for e in everything if e["type"] == "samples"] == [event["id"]]
    with session_factory() as session:
        assert session.get(StageRun, stage_run_id).lease_expires_at == lease  # not a heartbeat
    for bad in ({}, {"samples": "yes"}, {"samples": [1, 2]}):
        assert "payload.samples" in fields(report(client, stage_run_id, attempt, "samples", bad))
    assert report(client, stage_run_id, attempt + 1, "samples", {"samples": samples}).status_code == 409
    again = client.get(f"/jobs/{job['id']}/events", params={"type": "samples"}, headers=alice).json()
    assert [e["id"] for e in again["data"]] == [event["id"]]


def test_reports_are_fenced(client, alice, data_dir, session_factory):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    heartbeat = {"step": 1, "total_steps": 4}
    assert report(client, stage_run_id, attempt, "heartbeat", heartbeat, token="forged").status_code == 401
    other_attempt = Settings(report_secret=SECRET).report_token(stage_run_id, attempt + 1)
    assert report(client, stage_run_id, attempt, "heartbeat", heartbeat, token=other_attempt).status_code == 401
    stale = report(client, stage_run_id, attempt + 1, "heartbeat", heartbeat)
    assert stale.status_code == 409 and "stale" in stale.json()["detail"]
    assert report(client, stage_run_id, attempt, "heartbeat", heartbeat).json() == {"ok": True}
    client.post(f"/jobs/{job['id']}/cancel", headers=alice)
    assert report(client, stage_run_id, attempt, "heartbeat", heartbeat).status_code == 409
    assert report(client, "sr_unknown", 1, "heartbeat", heartbeat).status_code == 409
    bad_type = report(client, stage_run_id, attempt, "bogus", {})
    assert "type" in fields(bad_type)


def publish_artifact(settings, tmp_path, job_id) -> tuple:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "weights").mkdir()
    header = b'{"w": {"dtype": "U8", "shape": [16384], "data_offsets": [0, 16384]}}'
    (folder / "weights" / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(header)) + header + bytes(range(256)) * 64)
    store = ArtifactStore(settings.artifact_root)
    published = store.publish(
        folder, lineage="demo-sft", kind="adapter", stage={"type": "sft", "index": 0, "name": "sft"},
        base_model="builtin:tiny", spec_hash="sha256:0", job={"id": job_id, "name": "demo"},
    )
    manifest_bytes = (tmp_path / "artifacts" / "demo-sft" / "v1" / "manifest.json").read_bytes()
    return published, "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def test_artifacts(client, alice, bob, data_dir, session_factory, settings, tmp_path):
    job = submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    published, manifest_hash = publish_artifact(settings, tmp_path, job["id"])
    payload = {
        "artifact_id": published.artifact_id, "uri": published.uri, "lineage": "demo-sft", "version": 1,
        "kind": "adapter", "manifest_hash": manifest_hash, "parents": [], "metrics": {"loss": 0.5},
    }
    assert report(client, stage_run_id, attempt, "artifact", payload).status_code == 200

    artifact = client.get(f"/artifacts/{published.artifact_id}", headers=alice).json()
    assert artifact["id"] == published.artifact_id and artifact["job_id"] == job["id"]
    assert artifact["manifest_hash"] == manifest_hash and artifact["metrics"] == {"loss": 0.5}
    manifest = artifact["manifest"]
    assert set(manifest["files"]) == {"adapter_config.json", "weights/adapter_model.safetensors"}
    for path, entry in manifest["files"].items():
        response = client.get(f"/artifacts/{published.artifact_id}/files/{path}", headers=alice)
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == entry["sha256"]
        assert len(response.content) == entry["size"]
    raw_manifest = client.get(f"/artifacts/{published.artifact_id}/files/manifest.json", headers=alice)
    assert "sha256:" + hashlib.sha256(raw_manifest.content).hexdigest() == manifest_hash
    for bad in ("nope.bin", "weights", "../demo-sft/v1/adapter_config.json", "%2e%2e/%2e%2e/etc/passwd"):
        assert client.get(f"/artifacts/{published.artifact_id}/files/{bad}", headers=alice).status_code == 404
    stage = client.get(f"/jobs/{job['id']}", headers=alice).json()["stages"][0]
    assert stage["artifact_id"] == published.artifact_id
    listed = client.get("/jobs", headers=alice).json()["data"]
    assert [j["stages"][0]["artifact_id"] for j in listed if j["id"] == job["id"]] == [published.artifact_id]
    assert client.get(f"/artifacts/{published.artifact_id}", headers=bob).status_code == 404
    assert client.get(f"/artifacts/{published.artifact_id}/files/adapter_config.json", headers=bob).status_code == 404
    # Another tenant's artifact does not exist for bob; alice may start a job from her own policy.
    follow_up = make_spec(data_dir, name="next", base_model=f"artifact:{published.artifact_id}")
    assert "no artifact" in fields(client.post("/jobs", json=follow_up, headers=bob))["base_model"]
    assert submit(client, alice, follow_up)["spec"]["base_model"] == f"artifact:{published.artifact_id}"


def report_artifacts(client, session_factory, **kinds: str) -> None:
    """Claim the oldest queued stage and record artifacts ``id=kind`` for it (only the database rows)."""
    stage_run_id, attempt = claim_first_stage(session_factory)
    for artifact_id, kind in kinds.items():
        payload = {
            "artifact_id": artifact_id, "uri": f"/store/{artifact_id}", "lineage": artifact_id.split("-v")[0],
            "version": 1, "kind": kind, "manifest_hash": "sha256:" + "0" * 64, "parents": [], "metrics": {},
        }
        assert report(client, stage_run_id, attempt, "artifact", payload).status_code == 200


def ppo_spec(data_dir, reward_model: str, name: str = "rl") -> dict:
    ppo = {"type": "ppo", "data": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 2,
           "reward_model": reward_model}
    return make_spec(data_dir, name=name, stages=[make_spec(data_dir)["stages"][0], ppo])


def test_a_named_reward_model_must_be_one_of_the_callers_reward_models(
    client, alice, bob, data_dir, session_factory
):
    # One artifact per stage attempt: the service keeps the first an attempt reports.
    submit(client, alice, make_spec(data_dir))
    report_artifacts(client, session_factory, **{"demo.rm-v1-aaaaaaaaaaaa": "reward_model"})
    submit(client, alice, make_spec(data_dir))
    report_artifacts(client, session_factory, **{"demo.sft-v1-bbbbbbbbbbbb": "adapter"})
    submit(client, bob, make_spec(data_dir, name="bobs"))
    report_artifacts(client, session_factory, **{"bobs.rm-v1-cccccccccccc": "reward_model"})

    def refused(reward_model: str, headers=alice) -> dict[str, str]:
        return fields(client.post("/jobs", json=ppo_spec(data_dir, reward_model), headers=headers))

    unknown = refused("artifact:demo.rm-v9-ffffffffffff")
    assert list(unknown) == ["stages[1].reward_model"]
    assert unknown["stages[1].reward_model"] == (
        "no artifact 'demo.rm-v9-ffffffffffff'; give artifact:<id> of a reward model that an rm stage "
        "of one of your jobs published"
    )
    theirs = refused("artifact:bobs.rm-v1-cccccccccccc")
    assert theirs["stages[1].reward_model"].startswith("no artifact 'bobs.rm-v1-cccccccccccc';")
    adapter = refused("artifact:demo.sft-v1-bbbbbbbbbbbb")
    assert adapter == {
        "stages[1].reward_model": "'demo.sft-v1-bbbbbbbbbbbb' is an artifact of kind 'adapter', not a reward "
        "model; give artifact:<id> of an artifact an rm stage published (kind reward_model)"
    }
    # With an rm stage before it, the message also offers dropping the field.
    with_rm = ppo_spec(data_dir, "artifact:demo.sft-v1-bbbbbbbbbbbb")
    with_rm["stages"].insert(1, {"type": "rm", "data": {"path": str(data_dir / "prefs.jsonl")}})
    message = fields(client.post("/jobs", json=with_rm, headers=alice))["stages[2].reward_model"]
    assert message.endswith("or drop reward_model to score with the rm stage before this one")
    # Nothing was queued by the refused requests; the caller's own reward model is accepted.
    assert [j["name"] for j in client.get("/jobs", headers=alice).json()["data"]] == ["demo", "demo"]
    job = submit(client, alice, ppo_spec(data_dir, "artifact:demo.rm-v1-aaaaaaaaaaaa"))
    assert job["spec"]["stages"][1]["reward_model"] == "artifact:demo.rm-v1-aaaaaaaaaaaa"
    assert [s["type"] for s in job["stages"]] == ["sft", "ppo"]
    assert refused("artifact:demo.rm-v1-aaaaaaaaaaaa", headers=bob)["stages[1].reward_model"].startswith(
        "no artifact 'demo.rm-v1-aaaaaaaaaaaa';"
    )


def test_another_tenants_job_is_not_found(client, alice, bob, data_dir):
    job = submit(client, alice, make_spec(data_dir))
    for method, path in [
        ("GET", f"/jobs/{job['id']}"),
        ("POST", f"/jobs/{job['id']}/cancel"),
        ("GET", f"/jobs/{job['id']}/events"),
        ("GET", f"/jobs/{job['id']}/metrics"),
        ("GET", "/artifacts/some-v1-0123456789ab"),
    ]:
        assert client.request(method, path, headers=bob).status_code == 404, path
    assert client.get("/jobs", headers=bob).json()["data"] == []
    assert client.get(f"/jobs/{job['id']}", headers=alice).json()["status"] == "queued"
    stream = client.get(f"/jobs/{job['id']}/events", headers={**bob, "Accept": "text/event-stream"})
    assert stream.status_code == 404


def test_bad_specs_name_their_fields(client, alice, data_dir):
    spec = make_spec(data_dir)
    spec["stages"][1]["beta"] = -1
    spec["stages"][0]["colour"] = "red"
    spec["adapter"] = {"type": "lora", "r": 0}
    problems = fields(client.post("/jobs", json=spec, headers=alice))
    assert set(problems) == {"stages[1].beta", "stages[0].colour", "adapter.r"}
    assert "unknown field" in problems["stages[0].colour"]
    assert "stages" in fields(client.post("/jobs", json={"name": "x", "base_model": "builtin:tiny"}, headers=alice))
    assert "(body)" in fields(client.post("/jobs", json=[1, 2], headers=alice))
    not_json = client.post("/jobs", content=b"{not json", headers={**alice, "Content-Type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["field"]


def test_missing_data_and_columns_are_refused(client, alice, data_dir):
    spec = make_spec(data_dir)
    spec["stages"][0]["data"]["path"] = str(data_dir / "missing.jsonl")
    spec["stages"][1]["data"]["path"] = str(data_dir / "no-rejected.jsonl")
    problems = fields(client.post("/jobs", json=spec, headers=alice))
    assert "no such file" in problems["stages[0].data.path"]
    assert "'rejected'" in problems["stages[1].data.path"]
    builtin = make_spec(data_dir)
    builtin["stages"][0]["data"] = {"path": "builtin:parity/sft", "eval_path": "builtin:parity/eval"}
    assert client.post("/jobs", json=builtin, headers=alice).status_code == 201


def test_local_base_model_must_be_a_model_folder(client, alice, data_dir, tmp_path):
    model = tmp_path / "models" / "llama"
    model.mkdir()
    spec = make_spec(data_dir, base_model=str(model))
    assert "config.json" in fields(client.post("/jobs", json=spec, headers=alice))["base_model"]
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # safetensors: no tensors
    assert client.post("/jobs", json=spec, headers=alice).status_code == 201


@pytest.mark.parametrize(
    "field, location",
    [
        ("stages[1].data.path", "{data}/../secret.jsonl"),
        ("stages[1].data.path", "/etc/passwd"),
        ("stages[1].data.path", "http://169.254.169.254/latest/meta-data/iam"),
        ("stages[0].data.eval_path", "file:///etc/shadow"),
        ("base_model", "/etc"),
    ],
)
def test_forbidden_locations_are_refused(client, alice, data_dir, field, location):
    spec = make_spec(data_dir)
    value = location.format(data=data_dir)
    if field == "base_model":
        spec["base_model"] = value
    elif field.endswith("eval_path"):
        spec["stages"][0]["data"]["eval_path"] = value
    else:
        spec["stages"][1]["data"]["path"] = value
    assert field in fields(client.post("/jobs", json=spec, headers=alice))


def test_refuses_to_start_on_an_unmigrated_database(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}", run_dispatcher=False)
    with pytest.raises(RuntimeError, match="align db upgrade"), TestClient(create_app(settings)):
        pass


def test_an_expired_report_token_is_refused(client, alice, data_dir, session_factory, settings, monkeypatch):
    submit(client, alice, make_spec(data_dir))
    stage_run_id, attempt = claim_first_stage(session_factory)
    issued_long_ago = time.time() - settings.report_token_seconds - 60
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: issued_long_ago)
        old_token = settings.report_token(stage_run_id, attempt)
    refused = report(client, stage_run_id, attempt, "heartbeat", {"step": 1, "total_steps": 2}, token=old_token)
    assert refused.status_code == 401
    assert refused.json()["detail"].startswith("report token expired: issued ")
    assert "ALIGN_REPORT_TOKEN_SECONDS" in refused.json()["detail"]
    assert report(client, stage_run_id, attempt, "heartbeat", {"step": 1, "total_steps": 2}).status_code == 200


def test_gates_in_the_api(client, alice, data_dir, session_factory, settings, tmp_path):
    """A gate that could never be decided is a 422 naming the field; a reported gate shows on the stage, in
    the events, and a failed one in the job's status and the list filter."""
    spec = make_spec(data_dir)
    spec["stages"][0]["gate"] = {"metric": "eval_rewards_accuracy", "min": 0.5}
    assert fields(client.post("/jobs", json=spec, headers=alice)) == {
        "stages[0].gate.metric": "a sft stage does not report 'eval_rewards_accuracy'; use one of loss, "
                                 "eval_loss, eval_exact_match"}
    spec["stages"][0]["gate"] = {"metric": "loss", "max": 0.1}
    job = submit(client, alice, spec)
    assert job["spec"]["stages"][0]["gate"] == {"metric": "loss", "min": None, "max": 0.1,
                                                "min_delta_vs_parent": None}
    stage_run_id, attempt = claim_first_stage(session_factory)
    published, manifest_hash = publish_artifact(settings, tmp_path, job["id"])
    gate = {"metric": "loss", "value": 0.5, "baseline": None, "passed": False, "reason": "loss 0.5 > max 0.1"}
    payload = {
        "artifact_id": published.artifact_id, "uri": published.uri, "lineage": "demo-sft", "version": 1,
        "kind": "adapter", "manifest_hash": manifest_hash, "parents": [], "metrics": {"loss": 0.5}, "gate": gate,
    }
    bad_gate = {**payload, "gate": {**gate, "passed": "perhaps"}}
    assert report(client, stage_run_id, attempt, "artifact", bad_gate).status_code == 422
    assert report(client, stage_run_id, attempt, "artifact", payload).status_code == 200
    assert client.get(f"/jobs/{job['id']}", headers=alice).json()["stages"][0]["gate"] == gate
    events = client.get(f"/jobs/{job['id']}/events?type=gate", headers=alice).json()["data"]
    assert [(e["type"], e["level"], e["payload"]) for e in events] == [("gate", "error", gate)]
    with session_factory.begin() as s:
        transitions.fail(s, stage_run_id, attempt, "failed_gate", "gate failed: loss 0.5 > max 0.1",
                         "stages[0].gate")
    assert client.get(f"/jobs/{job['id']}", headers=alice).json()["status"] == "failed_gate"
    listed = client.get("/jobs?state=failed_gate", headers=alice).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get("/jobs?state=failed", headers=alice).json()["data"] == []


def test_a_stage_that_cannot_fit_its_workers_is_refused_with_what_would(settings, session_factory, data_dir):
    """With `ALIGN_PLAN_CPU_MEMORY_GIB` just under what the DPO stage plans to need, POST /jobs answers 422
    on `stages[1]` with the planner's shortfall and remedies, and queues nothing; /jobs/validate says the same."""
    from align.plan import plan_job
    from align.plan_fit import fit_problems
    from align.plan_report import load_model_config
    from align.spec import parse_spec
    from services.capacity import plan_device

    spec = make_spec(data_dir)
    job, config = parse_spec(spec), load_model_config("builtin:tiny")
    need = plan_job(job, config, plan_device(job.stage_resources(1), settings))[1].total
    tight = settings.model_copy(update={"plan_cpu_memory_gib": (need - 2**20) / 2**30})
    expected = fit_problems(job, config, plan_device(job.stage_resources(1), tight))
    assert [field for field, _ in expected] == ["stages[1]"] and "it would fit with any of" in expected[0][1]
    with TestClient(create_app(tight, session_factory=session_factory)) as client:
        key = {"Authorization": "Bearer bootstrap-key"}
        assert fields(client.post("/jobs", json=spec, headers=key)) == dict(expected)
        assert fields(client.post("/jobs/validate", json=spec, headers=key)) == dict(expected)
        assert client.get("/jobs", headers=key).json()["data"] == []
        roomy = settings.model_copy(update={"plan_cpu_memory_gib": (need + 2**20) / 2**30})
    with TestClient(create_app(roomy, session_factory=session_factory)) as client:
        assert client.post("/jobs", json=spec, headers=key).status_code == 201
