"""Credentials, on SQLite and Postgres: API keys are stored as hashes only, keys in a URL's query string are
refused before any route runs, and a tenant's API key cannot stand in for a worker's report token."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from itsdangerous import TimestampSigner
from sqlalchemy import inspect, text
from tenant_data import REPORT_SECRET, job_spec, make_settings, new_key, seed_job

from services.app import create_app
from services.db.models import StageRun
from services.settings import Settings

QUERY_NAMES = ["api_key", "API_KEY", "Api_Key", "apikey", "key", "KEY", "token", "Token", "access_token",
               "ACCESS_TOKEN", "Access_Token"]


@pytest.fixture
def world(tmp_path, database_url, session_factory):
    settings = make_settings(tmp_path, database_url, bootstrap_api_key="bootstrap-plaintext-key-0123456789")
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        tenant_a, key_a = new_key(session_factory, "tenant-a")
        _, key_b = new_key(session_factory, "tenant-b")
        yield client, settings, tenant_a, key_a, key_b


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def all_rows(session_factory) -> dict[str, list[dict]]:
    with session_factory() as session:
        tables = inspect(session.get_bind()).get_table_names()
        return {table: [dict(row) for row in session.execute(text(f'SELECT * FROM "{table}"')).mappings()]
                for table in tables}


def test_keys_are_stored_hashed(world, session_factory, database_url):
    client, settings, _, key_a, key_b = world
    # Use each key, so that anything a request might store (events, jobs) is there too.
    for key in (key_a, key_b, settings.bootstrap_api_key):
        assert client.post("/jobs", json=job_spec(settings), headers=bearer(key)).status_code == 201
    rows = all_rows(session_factory)
    keys = rows["api_keys"]
    assert len(keys) == 3
    plaintexts = (key_a, key_b, settings.bootstrap_api_key)
    assert sorted(row["key_hash"] for row in keys) == sorted(hashlib.sha256(k.encode()).hexdigest() for k in plaintexts)
    checked = 0
    for table, table_rows in rows.items():
        for row in table_rows:
            for column, value in row.items():
                for plaintext in plaintexts:
                    # Not the key, nor any 16-character piece of it, in any column of any row.
                    pieces = {plaintext[i:i + 16] for i in range(len(plaintext) - 15)}
                    assert not any(piece in str(value) for piece in pieces), (table, column)
                checked += 1
    assert checked > 50
    if database_url.startswith("sqlite"):  # the file itself, and its write-ahead log, hold no key either
        path = Path(database_url.removeprefix("sqlite:///"))
        stored = b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal")) if p.exists())
        assert stored and not any(k.encode() in stored for k in plaintexts)
        assert all(row["key_hash"].encode() in stored for row in keys)


def test_a_key_in_the_query_string_is_refused(world, session_factory):
    client, settings, _, key_a, _ = world
    requests = [("GET", "/jobs", None, {}), ("GET", "/jobs", None, bearer(key_a)),
                ("GET", "/jobs/job_0123/events", None, bearer(key_a)), ("GET", "/healthz", None, {}),
                ("GET", "/ui/", None, {}), ("GET", "/artifacts/x-v1-0123456789ab", None, {}),
                ("POST", "/jobs", job_spec(settings), bearer(key_a)),
                ("POST", "/internal/reports", {"stage_run_id": "sr_1", "attempt": 1, "type": "heartbeat",
                                               "payload": {}}, {})]
    refused = 0
    for name in QUERY_NAMES:
        for method, path, body, headers in requests:
            response = client.request(method, path, params={"limit": 5, name: key_a}, json=body, headers=headers)
            assert response.status_code == 400, (name, method, path, response.text)
            detail = response.json()["detail"]
            assert f"'{name}'" in detail and "Authorization: Bearer <key>" in detail, detail
            assert key_a not in response.text
            refused += 1
        # Percent-encoded, the name is refused the same way; a name that only contains one is not a key (it is
        # a parameter the route does not take: a 422 naming it, not the credentials answer).
        encoded = "".join(f"%{ord(c):02x}" for c in name)
        assert client.get(f"/jobs?{encoded}=x", headers=bearer(key_a)).status_code == 400
        other = client.get("/jobs", params={f"{name}s": "x"}, headers=bearer(key_a))
        assert other.status_code == 422 and other.json()["detail"][0]["field"] == f"{name}s", other.text
    assert refused == len(QUERY_NAMES) * len(requests) == 88
    # Refused before the route ran: none of the POSTs queued a job.
    assert all_rows(session_factory)["jobs"] == []


def test_a_tenant_key_cannot_forge_a_worker_report(world, session_factory):
    client, settings, tenant_a, key_a, key_b = world
    seeded = seed_job(session_factory, settings, tenant_a)
    run_attempt = f"{seeded.stage_run_id}:{seeded.attempt}"
    forgeries = {
        "A's key as the token": key_a,
        "B's key as the token": key_b,
        "a token signed with A's key": Settings(report_secret=key_a).report_token(seeded.stage_run_id, seeded.attempt),
        "a token signed with B's key": Settings(report_secret=key_b).report_token(seeded.stage_run_id, seeded.attempt),
        "signed with A's key, no salt": TimestampSigner(key_a).sign(run_attempt).decode(),
        "signed with A's key's hash": TimestampSigner(hashlib.sha256(key_a.encode()).hexdigest(),
                                                      salt="align.report-token").sign(run_attempt).decode(),
        "A's key with the signature of a real token": key_a + "." + Settings(report_secret=REPORT_SECRET)
        .report_token(seeded.stage_run_id, seeded.attempt).rsplit(".", 2)[-2],
    }

    def stage_row():
        with session_factory() as session:
            run = session.get(StageRun, seeded.stage_run_id)
            return run.state, run.progress_step, run.error_code, run.lease_expires_at

    def events():
        return len(all_rows(session_factory)["events"])

    before, events_before = stage_row(), events()
    reports = [("heartbeat", {"step": 2, "total_steps": 2}),
               ("failed", {"code": "forged", "message": "stop", "retryable": False}),
               ("artifact", {"artifact_id": "demo.sft-v2-0123456789ab", "uri": "/elsewhere", "lineage": "demo.sft",
                             "version": 2, "kind": "adapter", "manifest_hash": "sha256:" + "0" * 64,
                             "parents": [], "metrics": {}})]
    refused = 0
    for label, token in forgeries.items():
        for type_, payload in reports:
            body = {"stage_run_id": seeded.stage_run_id, "attempt": seeded.attempt, "type": type_, "payload": payload}
            response = client.post("/internal/reports", json=body, headers=bearer(token))
            assert response.status_code in (401, 403), (label, type_, response.text)
            refused += 1
    assert refused == len(forgeries) * len(reports) == 21
    assert stage_row() == before and events() == events_before
    assert {row["id"] for row in all_rows(session_factory)["artifacts"]} == {seeded.artifact_id}
    # The attempt's own token is taken: the refusals above were the token's, not the report's.
    genuine = Settings(report_secret=REPORT_SECRET).report_token(seeded.stage_run_id, seeded.attempt)
    body = {"stage_run_id": seeded.stage_run_id, "attempt": seeded.attempt, "type": "heartbeat",
            "payload": {"step": 2, "total_steps": 2}}
    assert client.post("/internal/reports", json=body, headers=bearer(genuine)).json() == {"ok": True}
    assert stage_row()[1] == 2
