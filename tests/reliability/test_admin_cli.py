"""`align tenants` and `align keys` against SQLite and Postgres: a second tenant made outside the tests' own
helpers, its key working at once, listed without its secret, and refused (401) from the request after it
is revoked; a missing or un-migrated database is refused with the command that fixes it."""

from __future__ import annotations

import os
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from typer.testing import CliRunner

from services.app import create_app
from services.cli import app
from services.db import auth
from services.settings import Settings

runner = CliRunner()


def align(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture
def cli_database(database_url, monkeypatch):
    monkeypatch.setenv("ALIGN_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def api(tmp_path, cli_database, session_factory):
    settings = Settings(database_url=cli_database, artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), data_roots=[str(tmp_path / "data")],
                        model_roots=[str(tmp_path / "models")],
                        report_secret="admin-cli-secret", run_dispatcher=False)
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create_key(tenant: str, *extra: str) -> tuple[str, str]:
    """The plaintext key (standard output, alone) and the key id (named on standard error)."""
    result = align("keys", "create", "--tenant", tenant, *extra)
    assert result.exit_code == 0, result.output
    plaintext = result.stdout.strip()
    assert "\n" not in plaintext and plaintext.startswith("align_")
    return plaintext, re.search(r"created key (key_\w+)", result.stderr).group(1)


def test_tenants_and_keys_round_trip(api, session_factory, cli_database):
    assert align("tenants", "create", "acme").exit_code == 0
    assert align("tenants", "create", "globex").exit_code == 0
    again = align("tenants", "create", "acme")
    assert again.exit_code == 1 and "tenant 'acme' exists already" in again.output
    acme_key, acme_id = create_key("acme", "--name", "ci")
    globex_key, globex_id = create_key("globex")
    unknown = align("keys", "create", "--tenant", "initech")
    assert unknown.exit_code == 1 and "no tenant 'initech'" in unknown.output
    assert "align tenants create" in unknown.output

    # The key works at once and acts as its tenant only.
    job_list = api.get("/jobs", headers=bearer(acme_key))
    assert job_list.status_code == 200 and job_list.json() == {"data": [], "next_cursor": None}
    with session_factory() as session:
        assert auth.tenant_for_key(session, acme_key).name == "acme"
        assert auth.tenant_for_key(session, globex_key).name == "globex"
        rows = session.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert {row["id"] for row in rows} == {acme_id, globex_id}

    listed = align("keys", "list")
    assert listed.exit_code == 0
    assert acme_id in listed.output and globex_id in listed.output and "ci" in listed.output
    only_acme = align("keys", "list", "--tenant", "acme").output
    assert acme_id in only_acme and globex_id not in only_acme
    for row in rows:  # neither the key nor its hash is ever printed
        assert row["key_hash"] not in listed.output
    assert acme_key not in listed.output and globex_key not in listed.output
    tenants = align("tenants", "list").output
    assert re.search(r"acme .* 1 ", tenants) and re.search(r"globex .* 1 ", tenants)

    revoked = align("keys", "revoke", acme_id)
    assert revoked.exit_code == 0 and "revoked key" in revoked.output
    # Revoked: the very next request is refused, and the other tenant's key is untouched.
    assert api.get("/jobs", headers=bearer(acme_key)).status_code == 401
    assert api.get("/jobs", headers=bearer(globex_key)).status_code == 200
    twice = align("keys", "revoke", acme_id)
    assert twice.exit_code == 0 and "revoked already" in twice.output
    missing = align("keys", "revoke", "key_0000000000000000")
    assert missing.exit_code == 1 and "align keys list" in missing.output
    acme_row = [line for line in align("keys", "list", "--tenant", "acme").output.splitlines() if acme_id in line]
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", acme_row[0])) == 2  # created and revoked
    assert re.search(r"acme .* 0 ", align("tenants", "list").output)
    # A new key for the tenant works; the revoked one stays refused.
    renewed, _ = create_key("acme")
    assert api.get("/jobs", headers=bearer(renewed)).status_code == 200
    assert api.get("/jobs", headers=bearer(acme_key)).status_code == 401


@pytest.mark.parametrize("name", ["", "   ", "a\tb", "x" * 201])
def test_bad_names_are_refused(cli_database, session_factory, name):
    result = align("tenants", "create", name)
    assert result.exit_code == 2 and "printable characters" in result.output
    assert align("tenants", "create", "acme").exit_code == 0
    labelled = align("keys", "create", "--tenant", "acme", "--name", name)
    assert labelled.exit_code == 2 and "printable characters" in labelled.output
    with session_factory() as session:
        assert [tenant.name for tenant in auth.list_tenants(session)] == ["acme"]
        assert auth.list_api_keys(session) == []


def test_an_unmigrated_database_is_refused(empty_database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_DATABASE_URL", empty_database_url)
    for args in (["tenants", "list"], ["tenants", "create", "acme"], ["keys", "list"],
                 ["keys", "create", "--tenant", "acme"], ["keys", "revoke", "key_1"]):
        result = align(*args)
        if empty_database_url.startswith("sqlite"):
            assert result.exit_code == 2 and "no database at" in result.output, args
            assert "align db upgrade" in result.output
        else:
            assert result.exit_code == 2 and "empty database" in result.output, args
            assert "run `align db upgrade`" in result.output
    if empty_database_url.startswith("sqlite"):
        path = empty_database_url.removeprefix("sqlite:///")
        assert not os.path.exists(path)  # refused without creating the file
        open(path, "w").close()  # an empty file: a database with no tables
        result = align("tenants", "list")
        assert result.exit_code == 2 and "empty database" in result.output


def test_an_unreachable_database_is_refused(monkeypatch):
    monkeypatch.setenv("ALIGN_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    result = align("tenants", "list")
    assert result.exit_code == 2 and "cannot reach the database at" in result.output
    monkeypatch.setenv("ALIGN_DATABASE_URL", "not a url")
    result = align("keys", "list")
    assert result.exit_code == 2 and "is not a database URL" in result.output
