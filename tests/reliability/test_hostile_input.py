"""Hostile and absurd input against the HTTP API, on SQLite and Postgres: every case gets a 4xx that names
the field, never a 500 and never a 201 for a value no stage could train with."""

from __future__ import annotations

import json
import time
from typing import get_args

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from align import spec as spec_module
from services.app import create_app
from services.db import auth, transitions
from services.settings import Settings

SECRET = "test-report-secret"
MAX_REQUEST_BYTES = 64 * 1024
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999"]
STAGES = {
    spec_module.SFTStage: {"type": "sft", "data": {"path": "sft.jsonl"}},
    spec_module.RewardModelStage: {"type": "rm", "data": {"path": "prefs.jsonl"}},
    spec_module.DPOStage: {"type": "dpo", "data": {"path": "prefs.jsonl"}},
    spec_module.PPOStage: {"type": "ppo", "data": {"path": "prefs.jsonl"}, "reward": "exact_answer",
                           "critic_init": "policy"},
    spec_module.GRPOStage: {"type": "grpo", "data": {"path": "prefs.jsonl"}, "reward": "exact_answer"},
}
JOB_PARTS = {"adapter": spec_module.AdapterSpec, "deepspeed": spec_module.DeepSpeedSpec,
             "resources": spec_module.ResourcesSpec}


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (root / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 4)
    (root / "prefs.jsonl").write_text((json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n") * 4)
    return root


@pytest.fixture
def client(tmp_path, database_url, session_factory, data_dir):
    (tmp_path / "models").mkdir()
    settings = Settings(
        database_url=database_url, artifact_root=str(tmp_path / "artifacts"), work_root=str(tmp_path / "work"),
        data_roots=[str(data_dir)], model_roots=[str(tmp_path / "models")], report_secret=SECRET,
        run_dispatcher=False, max_request_bytes=MAX_REQUEST_BYTES,
    )
    with TestClient(create_app(settings, session_factory=session_factory)) as test_client:
        with session_factory() as session:
            tenant = auth.create_tenant(session, "alice")
            _, plaintext = auth.create_api_key(session, tenant.id, "test")
            session.commit()
        test_client.headers["Authorization"] = f"Bearer {plaintext}"
        yield test_client


def make_spec(data_dir, stages=None, **overrides) -> dict:
    stages = stages or [{"type": "sft", "data": {"path": "sft.jsonl"}, "max_steps": 2}]
    for stage in stages:
        stage["data"] = {**stage["data"], "path": str(data_dir / stage["data"]["path"])}
    return {"name": "hostile", "base_model": "builtin:tiny", "stages": stages, **overrides}


def fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {item["field"]: item["message"] for item in response.json()["detail"]}


def post_raw(client, text: str, path: str = "/jobs"):
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


def _float_fields(model: type[BaseModel]) -> list[str]:
    return [name for name, field in model.model_fields.items()
            if float in (field.annotation, *get_args(field.annotation))]


def float_cases() -> list[tuple[str, dict]]:
    """(field, spec with the placeholder "BAD" in that field) for every float field of every spec model."""
    cases = []
    for part, model in JOB_PARTS.items():
        cases += [(f"{part}.{name}", {part: {name: "BAD"}}) for name in _float_fields(model)]
    for model, stage in STAGES.items():
        for name in _float_fields(model):
            cases.append((f"stages[0].{name}", {"stages": [{**stage, name: "BAD"}]}))
    data_floats = _float_fields(spec_module.DataSpec)
    cases += [(f"stages[0].data.{name}", {"stages": [{**STAGES[spec_module.SFTStage],
                                                      "data": {"path": "sft.jsonl", name: "BAD"}}]})
              for name in data_floats]
    return cases


def test_non_finite_floats_are_refused_in_every_spec_field(client, data_dir):
    """NaN, Infinity, -Infinity and 1e999 (read as Infinity) in each float field: 422 naming that field, where
    Postgres answered 500 ("invalid input syntax for type json") and SQLite stored null."""
    cases = float_cases()
    assert len(cases) > 40 and {"stages[0].epochs", "stages[0].beta", "stages[0].sft_weight", "adapter.alpha",
                                "stages[0].weight_decay", "stages[0].lr"} <= {field for field, _ in cases}
    for i, (field, overrides) in enumerate(cases):
        tokens = NON_FINITE if field == "stages[0].epochs" else [NON_FINITE[i % len(NON_FINITE)]]
        for token in tokens:
            spec = make_spec(data_dir, **{k: v for k, v in overrides.items() if k != "stages"},
                             stages=[dict(s) for s in overrides.get("stages", [])] or None)
            response = post_raw(client, json.dumps(spec).replace('"BAD"', token))
            problems = fields(response)
            assert problems.get(field, "").startswith("Input should be a finite number"), (field, token, problems)
    assert client.get("/jobs").json()["data"] == []


ABSURD = [
    ("stages[0].batch_size", 1e30), ("stages[0].max_steps", 1e30), ("stages[0].max_length", 10**9),
    ("stages[0].epochs", 1e308), ("resources.cpus_per_worker", 1e308), ("resources.gpus_per_worker", 10**9),
    ("stages[0].batch_size", -1), ("stages[0].seed", -1), ("stages[0].seed", 2**63),
    ("stages[0].gradient_accumulation_steps", 10**12), ("stages[0].checkpoint_every", 2**64),
    ("stages[0].data.max_rows", 10**30), ("adapter.alpha", 1e300), ("stages[0].weight_decay", 1e10),
]


def test_absurd_numbers_are_refused(client, data_dir):
    """Sizes no stage could train with, and negatives, get 422 naming the field (all were 201 but the
    negatives)."""
    for field, value in ABSURD:
        spec = make_spec(data_dir)
        stage = spec["stages"][0]
        if field.startswith("stages[0].data."):
            stage["data"][field.rsplit(".", 1)[1]] = value
        elif field.startswith("stages[0]."):
            stage[field.split(".", 1)[1]] = value
        else:
            part, name = field.split(".")
            spec[part] = {name: value}
        problems = fields(client.post("/jobs", json=spec))
        assert set(problems) == {field}, (field, value, problems)
        assert str(value) in problems[field] or repr(value) in problems[field] or "range" in problems[field]
    assert client.get("/jobs").json()["data"] == []


def test_nul_and_odd_unicode_are_refused(client, data_dir):
    """NUL in an id, a cursor or a body string; lone surrogates; look-alike letters in names."""
    assert client.get("/jobs/%00").status_code == 404
    assert client.get("/jobs/job%00x/events").status_code == 404
    assert client.get("/artifacts/%00").status_code == 404
    assert fields(client.get("/jobs", params={"cursor": "\x00"})) == {"cursor": "holds a NUL character (%00); "
                                                                       "remove it"}
    body_cases = [
        ("base_model", lambda s: s.update(base_model="builtin:tiny\x00")),
        ("stages[0].data.path", lambda s: s["stages"][0]["data"].update(path="/etc/\x00passwd")),
        ("stages[0].data.path", lambda s: s["stages"][0]["data"].update(path="data\ud800.jsonl")),
        ("name", lambda s: s.update(name="ｄｅｍｏ")),  # fullwidth letters
        ("name", lambda s: s.update(name="demo\u202egpj")),  # right-to-left override
        ("stages[0].name", lambda s: s["stages"][0].update(name="sft\u200b")),  # zero-width space
    ]
    for field, change in body_cases:
        spec = make_spec(data_dir)
        change(spec)
        # ensure_ascii keeps a lone surrogate as its \\ud800 escape, as a hostile client would send it.
        problems = fields(post_raw(client, json.dumps(spec)))
        assert field in problems, (field, problems)
    assert client.get("/jobs").json()["data"] == []


def test_bodies_too_large_too_deep_or_too_wide_are_refused_quickly(client, data_dir):
    too_large = json.dumps(make_spec(data_dir, padding="x" * MAX_REQUEST_BYTES))
    response = post_raw(client, too_large)
    assert response.status_code == 413 and str(MAX_REQUEST_BYTES) in response.json()["detail"]
    chunked = client.post("/jobs", content=iter([too_large.encode()[:40000], too_large.encode()[40000:]]),
                          headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and str(MAX_REQUEST_BYTES) in chunked.json()["detail"]
    deep = make_spec(data_dir)
    deep["stages"][0]["data"]["path"] = json.loads("[" * 200 + "]" * 200)
    assert "nested deeper" in " ".join(fields(post_raw(client, json.dumps(deep))).values())
    very_deep = post_raw(client, "[" * 30000 + "]" * 30000)
    assert 400 <= very_deep.status_code < 500, very_deep.text
    wide = make_spec(data_dir, **{f"f{i}": 0 for i in range(5000)})
    started = time.perf_counter()
    problems = fields(post_raw(client, json.dumps(wide)))
    assert time.perf_counter() - started < 1.0
    assert list(problems) == ["(body)"] and "at most 1000" in problems["(body)"]
    assert client.get("/jobs").json()["data"] == []


def test_event_ids_out_of_range_are_refused(client, data_dir):
    job = client.post("/jobs", json=make_spec(data_dir)).json()
    events = f"/jobs/{job['id']}/events"
    for after in (2**31, 2**63, 2**64, -1):
        assert "after" in fields(client.get(events, params={"after": after})), after
    assert client.get(events, params={"after": 2**31 - 1}).json()["data"] == []
    stream = {"Accept": "text/event-stream"}
    for last in ("²".encode("latin-1"), "²".encode(), "١٢".encode(), b"2147483648", b"-1", b"1e3"):
        problems = fields(client.get(events, headers={**stream, "Last-Event-ID": last}))
        assert "Last-Event-ID" in problems, (last, problems)
    client.post(f"/jobs/{job['id']}/cancel")
    with client.stream("GET", events, headers={**stream, "Last-Event-ID": "0"}) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200 and "event: end" in text and "event: state" in text


def claim_first_stage(client, session_factory, data_dir) -> tuple[str, str, int]:
    job = client.post("/jobs", json=make_spec(data_dir)).json()
    with session_factory() as session:
        run = transitions.claim_next(session, "test-owner", 300)
        session.commit()
        return job["id"], run.id, run.attempt


def report(client, stage_run_id, attempt, type, payload: dict | str):
    token = Settings(report_secret=SECRET).report_token(stage_run_id, attempt)
    body = {"stage_run_id": stage_run_id, "attempt": attempt, "type": type, "payload": "PAYLOAD"}
    text = json.dumps(body).replace('"PAYLOAD"', payload if isinstance(payload, str) else json.dumps(payload))
    return client.post("/internal/reports", content=text.encode(),
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


ARTIFACT = {"artifact_id": "hostile.sft-v1", "uri": "file:///nowhere/hostile.sft/v1", "lineage": "hostile.sft",
            "version": 1, "kind": "adapter", "manifest_hash": "sha256:00", "parents": []}
MALFORMED_REPORTS = [
    ("checkpoint", {"step": 3}, "payload.uri"),
    ("checkpoint", {"step": 3, "uri": 7}, "payload.uri"),
    ("checkpoint", {"step": 2**31, "uri": "file:///c"}, "payload.step"),
    ("heartbeat", {"step": "three", "total_steps": 10}, "payload.step"),
    ("heartbeat", {"step": 2**31, "total_steps": 10}, "payload.step"),
    ("heartbeat", {"step": 1, "total_steps": 2**63}, "payload.total_steps"),
    ("heartbeat", {"step": -1}, "payload.step"),
    ("metrics", {"step": 2**40, "loss": 1.0}, "payload.step"),
    ("artifact", {k: v for k, v in ARTIFACT.items() if k != "manifest_hash"}, "payload.manifest_hash"),
    ("artifact", {k: v for k, v in ARTIFACT.items() if k != "artifact_id"}, "payload.artifact_id"),
    ("artifact", {**ARTIFACT, "version": "one"}, "payload.version"),
    ("artifact", {**ARTIFACT, "kind": "k" * 51}, "payload.kind"),
    ("failed", {"code": "c" * 101, "message": "m"}, "payload.code"),
    ("message", {"level": "l" * 21, "text": "t"}, "payload.level"),
    ("message", {"level": "info", "text": "a\x00b"}, "payload.text"),
]


def test_malformed_worker_reports_are_refused(client, data_dir, session_factory):
    job_id, stage_run_id, attempt = claim_first_stage(client, session_factory, data_dir)
    for type, payload, field in MALFORMED_REPORTS:
        problems = fields(report(client, stage_run_id, attempt, type, payload))
        assert field in problems, (type, payload, problems)
    stage = client.get(f"/jobs/{job_id}").json()["stages"][0]
    assert (stage["state"], stage["progress"]["step"], stage["checkpoint_step"], stage["artifact_id"]) == (
        "running", None, None, None)


def test_non_finite_metrics_are_recorded_as_strings(client, data_dir, session_factory):
    """A diverged run reports NaN and Infinity: the metrics and the artifact are recorded, the values kept as
    "NaN", "Infinity" and "-Infinity"."""
    job_id, stage_run_id, attempt = claim_first_stage(client, session_factory, data_dir)
    metrics = '{"step": 1, "loss": NaN, "grad_norm": Infinity, "reward": -Infinity, "lr": 1e999}'
    assert report(client, stage_run_id, attempt, "metrics", metrics).json() == {"ok": True}
    (record,) = client.get(f"/jobs/{job_id}/metrics").json()[0]["records"]
    assert record == {"attempt": attempt, "step": 1, "loss": "NaN", "grad_norm": "Infinity", "reward": "-Infinity",
                      "lr": "Infinity"}
    artifact = json.dumps({**ARTIFACT, "metrics": "METRICS"}).replace('"METRICS"', '{"final_loss": NaN}')
    assert report(client, stage_run_id, attempt, "artifact", artifact).json() == {"ok": True}
    assert client.get(f"/jobs/{job_id}").json()["stages"][0]["artifact_id"] == ARTIFACT["artifact_id"]
    assert client.get(f"/artifacts/{ARTIFACT['artifact_id']}").json()["metrics"] == {"final_loss": "NaN"}
