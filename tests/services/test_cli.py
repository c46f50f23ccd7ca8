"""The `align` command's service side and the client's spec reading."""

from __future__ import annotations

import sqlite3

import yaml
from typer.testing import CliRunner

from align.client import ServiceError, read_spec
from services.cli import app

runner = CliRunner()


def test_db_upgrade_and_downgrade_on_sqlite(tmp_path, monkeypatch):
    path = tmp_path / "align.db"
    monkeypatch.setenv("ALIGN_DATABASE_URL", f"sqlite:///{path}")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert {"jobs", "stage_runs", "events", "artifacts", "tenants", "api_keys"} <= tables
    assert runner.invoke(app, ["db", "downgrade", "base"]).exit_code == 0
    tables = {row[0] for row in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")}
    assert "jobs" not in tables


def test_dispatcher_needs_ray_address_and_shared_secret(monkeypatch):
    monkeypatch.delenv("ALIGN_RAY_ADDRESS", raising=False)
    result = runner.invoke(app, ["dispatcher"])
    assert result.exit_code == 2 and "ALIGN_RAY_ADDRESS" in result.output
    monkeypatch.setenv("ALIGN_RAY_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.delenv("ALIGN_REPORT_SECRET", raising=False)
    result = runner.invoke(app, ["dispatcher"])
    assert result.exit_code == 2 and "ALIGN_REPORT_SECRET" in result.output


def test_submit_without_a_service_says_so(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: x\nbase_model: builtin:tiny\nstages: [{type: sft, data: {path: builtin:parity/sft}}]\n")
    result = runner.invoke(app, ["submit", str(spec), "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 1 and "cannot reach the service" in result.output


def test_read_spec_makes_relative_locations_absolute(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    spec = folder / "job.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "x", "base_model": "models/base",
        "stages": [{"type": "sft", "data": {"path": "data/sft.jsonl", "eval_path": "/abs/eval.jsonl"}},
                   {"type": "dpo", "data": {"path": "builtin:parity/prefs"}}],
    }))
    data = read_spec(spec)
    assert data["base_model"] == str(folder / "models" / "base")
    assert data["stages"][0]["data"] == {"path": str(folder / "data" / "sft.jsonl"), "eval_path": "/abs/eval.jsonl"}
    assert data["stages"][1]["data"]["path"] == "builtin:parity/prefs"


def test_service_error_lists_fields():
    error = ServiceError(422, [{"field": "stages[0].lr", "message": "must be > 0"}])
    assert error.errors == [("stages[0].lr", "must be > 0")]
    assert "stages[0].lr: must be > 0" in str(error)
