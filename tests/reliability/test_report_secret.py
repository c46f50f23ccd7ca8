"""Worker reports across a service restart and an outage: the report secret outlives the process, and the
worker's reporter holds what the service cannot take, in order, until its deadline."""

from __future__ import annotations

import json
import logging
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from services.app import create_app
from services.db import auth, transitions
from services.settings import Settings
from workers.report import Reporter


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGN_REPORT_SECRET", raising=False)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def service_settings(tmp_path, database_url) -> Settings:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 4)
    return Settings(database_url=database_url, artifact_root=str(tmp_path / "artifacts"),
                    work_root=str(tmp_path / "work"), data_roots=[str(data)], model_roots=[str(data)],
                    run_dispatcher=False)


def test_a_restarted_service_takes_the_reports_of_running_attempts(tmp_path, state_dir, database_url,
                                                                   session_factory):
    """The token a worker got from the first service process is taken by the next one (same state folder);
    before, each process drew its own secret and every in-flight report got 401."""
    first = service_settings(tmp_path, database_url)
    with TestClient(create_app(first, session_factory=session_factory)) as client:
        with session_factory() as session:
            tenant = auth.create_tenant(session, "alice")
            _, key = auth.create_api_key(session, tenant.id, "test")
            session.commit()
        spec = {"name": "restart", "base_model": "builtin:tiny",
                "stages": [{"type": "sft", "data": {"path": str(tmp_path / "data" / "sft.jsonl")}, "max_steps": 2}]}
        job = client.post("/jobs", json=spec, headers={"Authorization": f"Bearer {key}"}).json()
        with session_factory() as session:
            run = transitions.claim_next(session, "test-owner", 300)
            session.commit()
        token = first.report_token(run.id, run.attempt)

    secret_file = state_dir / "report_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret_file.read_text().strip() == first.report_secret and len(first.report_secret) == 64

    second = service_settings(tmp_path, database_url)
    assert second.check_report_token(run.id, run.attempt, token) is None
    with TestClient(create_app(second, session_factory=session_factory)) as client:
        body = {"stage_run_id": run.id, "attempt": run.attempt, "type": "heartbeat",
                "payload": {"step": 20, "total_steps": 40}}
        answer = client.post("/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        stage = client.get(f"/jobs/{job['id']}", headers={"Authorization": f"Bearer {key}"}).json()["stages"][0]
    assert stage["progress"]["step"] == 20


def test_an_explicit_report_secret_wins_over_the_stored_one(state_dir, monkeypatch):
    settings = Settings()
    assert settings.report_secret is None and not (state_dir / "report_secret").exists()  # nothing signed yet
    settings.report_token("sr_1", 1)
    stored = settings.report_secret
    monkeypatch.setenv("ALIGN_REPORT_SECRET", "from-the-environment")
    assert Settings().report_secret == "from-the-environment"
    assert Settings(report_secret="from-code").report_secret == "from-code"
    assert (state_dir / "report_secret").read_text().strip() == stored != "from-the-environment"


class ReportServer:
    """A real HTTP server on ``port`` that answers the first ``unavailable`` reports 503, then 200."""

    def __init__(self, port: int, unavailable: int = 0):
        self.unavailable = unavailable
        self.answers: list[tuple[int, dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 503 if server.unavailable > 0 else 200
                server.unavailable -= 1
                server.answers.append((status, body))
                payload = b'{"ok": true}' if status == 200 else b'{"detail": "database unavailable"}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def taken(self) -> list[tuple[str, int]]:
        return [(body["type"], body["payload"].get("step")) for status, body in self.answers if status == 200]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def reporter_to(port: int, **options) -> Reporter:
    options = {"retries": 1, "backoff": 0.02, "max_backoff": 0.1, "timeout": 2.0, **options}
    return Reporter(f"http://127.0.0.1:{port}/internal/reports", "token", "sr_1", 1, **options)


def test_reports_are_held_while_the_service_is_down_and_delivered_in_order(caplog):
    """Nothing listens while the attempt trains (a restart): its reports, the artifact last, are held and
    delivered in order once the service is back, while the reporter closes."""
    port = free_port()
    reporter = reporter_to(port, deadline=30)
    for step in (1, 2, 3):
        assert not reporter.metrics({"step": step, "loss": 1.0 / step})
    reporter.checkpoint(3, "/work/step-3")
    assert [held["type"] for held in reporter.held] == ["metrics"] * 3 + ["checkpoint"]
    servers = []
    threading.Timer(0.5, lambda: servers.append(ReportServer(port))).start()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            reporter.close()
        assert time.monotonic() - started >= 0.4
        assert servers[0].taken() == [("metrics", 1), ("metrics", 2), ("metrics", 3), ("checkpoint", 3)]
        assert "never delivered" not in caplog.text
    finally:
        for server in servers:
            server.close()


def test_reports_answered_503_are_retried_and_delivered_in_order():
    port = free_port()
    server = ReportServer(port, unavailable=5)
    try:
        reporter = reporter_to(port, deadline=30)
        reporter.metrics({"step": 1, "loss": 1.0})
        reporter.metrics({"step": 2, "loss": 0.5})
        reporter.message("done")
        reporter.close()
        statuses = [status for status, _ in server.answers]
        assert statuses[:5] == [503] * 5 and set(statuses[5:]) == {200}
        assert server.taken() == [("metrics", 1), ("metrics", 2), ("message", None)]
    finally:
        server.close()


def test_the_reporter_gives_up_only_after_its_deadline(caplog):
    port = free_port()
    server = ReportServer(port, unavailable=10**6)
    try:
        reporter = reporter_to(port, deadline=0.6)
        reporter.checkpoint(5, "/work/step-5")
        tries_before_close = len(server.answers)
        started = time.monotonic()
        reporter.close()
        assert time.monotonic() - started >= 0.6
        assert len(server.answers) > tries_before_close + 2  # it kept trying until the deadline
        assert server.taken() == []
        assert ("1 reports (checkpoint) of sr_1 attempt 1 were never delivered to "
                f"http://127.0.0.1:{port}/internal/reports; gave up after the 0.6 s deadline") in caplog.text
    finally:
        server.close()
