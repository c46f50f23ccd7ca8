"""Live event streams on Postgres: woken by LISTEN/NOTIFY, not by polling; polling again when LISTEN fails."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time

import pytest
from fastapi.testclient import TestClient
from test_api import claim_first_stage, data_dir, make_spec, report, settings, submit  # noqa: F401 - fixtures

from align.client import Client
from services.app import create_app
from services.routes import jobs as job_routes

BEARER = {"Authorization": "Bearer bootstrap-key"}
postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


def _wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@contextlib.contextmanager
def _writing(live: TestClient, job_id: str, write, bound: float = 30.0):
    """Run ``write()`` in a thread while the body reads the job's event stream.

    The job is cancelled, which ends its stream, when ``write`` fails or ``bound`` seconds pass: a
    missing event fails the test in seconds, not at pytest's timeout. The thread's failure fails the
    test here, in the test's own thread.
    """
    errors: list[BaseException] = []

    def cancel() -> None:
        live.post(f"/jobs/{job_id}/cancel", headers=BEARER)

    def run() -> None:
        try:
            write()
        except BaseException as error:  # raised again in the test's thread below
            errors.append(error)
            cancel()

    watchdog = threading.Timer(bound, cancel)
    writer = threading.Thread(target=run, daemon=True)
    watchdog.start()
    writer.start()
    try:
        yield
    finally:
        watchdog.cancel()
        writer.join(bound)
    assert not writer.is_alive(), f"the writing thread did not finish in {bound:g} s"
    if errors:
        raise AssertionError(f"the writing thread failed: {errors[0]!r}") from errors[0]


def _time_to_live_event(live: TestClient, session_factory, data_folder) -> float:
    """Seconds from posting a report (1 s into an open stream) to its event arriving on the stream."""
    job = submit(live, BEARER, make_spec(data_folder))
    stage_run_id, attempt = claim_first_stage(session_factory)
    posted, arrived = {}, None

    def later() -> None:
        time.sleep(1.0)
        posted["at"] = time.monotonic()
        answer = report(live, stage_run_id, attempt, "message", {"level": "info", "text": "live"})
        assert answer.status_code == 200, answer.text

    headers = {**BEARER, "Accept": "text/event-stream"}
    with live.stream("GET", f"/jobs/{job['id']}/events", headers=headers) as response, \
            _writing(live, job["id"], later):
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line.removeprefix("data: ")).get("payload", {}).get(
                    "text") == "live":
                arrived = time.monotonic()
                break
    assert arrived is not None, "the stream ended (the job was cancelled after 30 s) without the event"
    return arrived - posted["at"]


@postgres_only
def test_notify_wakes_the_stream_without_waiting_for_a_poll(settings, session_factory, data_dir):  # noqa: F811
    settings = settings.model_copy(update={"sse_poll_seconds": 30.0})
    with TestClient(create_app(settings, session_factory=session_factory)) as live:
        _wait_for(lambda: live.app.state.event_waker.listening, 20)
        latency = _time_to_live_event(live, session_factory, data_dir)
    # Without the notification the stream would read again only after 15 s (keep-alive) or 30 s (poll);
    # a notified stream reads at once (the bound leaves room for a loaded machine).
    assert latency < 8.0


@postgres_only
def test_a_failed_listen_falls_back_to_polling(settings, session_factory, data_dir, caplog):  # noqa: F811
    app = create_app(settings, session_factory=session_factory)
    app.state.event_waker.conninfo = "postgresql://postgres@127.0.0.1:1/nowhere"
    with caplog.at_level(logging.WARNING, logger="services.db.notify"), TestClient(app) as live:
        _wait_for(lambda: "LISTEN align_events failed" in caplog.text, 20)
        assert not live.app.state.event_waker.listening
        latency = _time_to_live_event(live, session_factory, data_dir)
    assert latency < 8.0  # polling every 0.5 s, not waiting for the 15 s keep-alive (room for a loaded machine)
    assert "live event streams poll every 0.5 s" in caplog.text


def test_the_client_stream_skips_keep_alives_and_ends_with_the_job(settings, session_factory, data_dir,  # noqa: F811
                                                                    monkeypatch):
    monkeypatch.setattr(job_routes, "SSE_KEEPALIVE_SECONDS", 0.05)
    with TestClient(create_app(settings, session_factory=session_factory)) as live:
        job = submit(live, BEARER, make_spec(data_dir))
        stage_run_id, attempt = claim_first_stage(session_factory)
        assert report(live, stage_run_id, attempt, "message", {"level": "info", "text": "first"}).status_code == 200

        def later() -> None:  # keep-alives go out in between, after an event with an id
            time.sleep(0.5)
            sent = report(live, stage_run_id, attempt, "message", {"level": "info", "text": "second"})
            assert sent.status_code == 200
            time.sleep(0.3)
            assert live.post(f"/jobs/{job['id']}/cancel", headers=BEARER).status_code == 200

        client = Client(api_key="bootstrap-key")
        client.http = live
        live.headers.update(BEARER)
        with _writing(live, job["id"], later):
            events = list(client.stream_events(job["id"]))
    texts = [e["payload"]["text"] for e in events if e["type"] == "message"]
    assert texts[-2:] == ["first", "second"]
    assert all(e["job_id"] == job["id"] for e in events)
    moves = [(e["payload"]["from"], e["payload"]["to"]) for e in events if e["type"] == "state"]
    assert ("running", "cancelled") in moves
