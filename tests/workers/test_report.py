"""The reporter's delivery rules and the entrypoint's failure classification, without Ray or training."""

from __future__ import annotations

import json
import time
from collections import deque

import pytest
from worker_helpers import TOKEN, make_ticket

from align.data.load import DataError
from align.stage_launch import StageLaunch
from align.stages.loop import MissingCheckpoint
from services.settings import Settings
from workers.entrypoint import EXIT_BAD_TICKET, classify, main
from workers.report import Fenced, Reporter, TokenExpired


def reporter_for(receiver, **options) -> Reporter:
    return Reporter(receiver.url, TOKEN, "sr_1", 2, **{"backoff": 0.01, **options})


def test_reports_carry_the_attempt_and_payload(receiver):
    reporter = reporter_for(receiver)
    assert reporter.send("message", {"level": "info", "text": "hi"})
    reporter.checkpoint(3, "/work/checkpoints/step-00000003")
    assert [(r["stage_run_id"], r["attempt"], r["type"]) for r in receiver.reports] == [
        ("sr_1", 2, "message"),
        ("sr_1", 2, "checkpoint"),
    ]
    assert receiver.reports[1]["payload"] == {"step": 3, "uri": "/work/checkpoints/step-00000003"}


def test_samples_go_out_as_one_samples_report(receiver):
    records = [
        {"step": 2, "prompt": "Is 3 odd?", "completion": "yes", "score": 0.5},
        {"step": 2, "prompt": "Is 4 odd?", "completion": "yes", "score": -1.0},
    ]
    reporter_for(receiver).samples(records)
    (sent,) = receiver.reports
    assert (sent["stage_run_id"], sent["attempt"], sent["type"]) == ("sr_1", 2, "samples")
    assert sent["payload"] == {"samples": records}


def test_non_finite_metrics_go_out_as_strings(receiver):
    """JSON has no NaN: a diverged loss is sent as "NaN" (httpx refuses to encode the float)."""
    reporter = reporter_for(receiver)
    assert reporter.send("metrics", {"step": 4, "loss": float("nan"), "kl": [float("inf"), -float("inf")]})
    assert receiver.reports[0]["payload"] == {"step": 4, "loss": "NaN", "kl": ["Infinity", "-Infinity"]}


def test_a_409_raises_fenced(receiver):
    receiver.fence_when = lambda report: report["type"] == "metrics"
    reporter = reporter_for(receiver)
    reporter.heartbeat(1, 10)
    with pytest.raises(Fenced):
        reporter.metrics({"step": 2, "loss": 1.0})
    assert len(receiver.reports) == 2  # a 409 is final: never retried
    assert reporter.held == deque()  # nothing of a fenced-off attempt is sent again
    reporter.close()  # and closing sends nothing and raises nothing
    assert len(receiver.reports) == 2


def test_unavailable_service_is_retried_with_jittered_backoff(receiver):
    waits = []
    receiver.unavailable = 2
    reporter = reporter_for(receiver, retries=2, max_backoff=0.02, sleep=waits.append)
    assert reporter.send("heartbeat", {"step": 1, "total_steps": 2})
    assert [r["status"] for r in receiver.reports] == [503, 503, 200]
    # wait_random_exponential: after try n a random wait in [0, min(0.02, 0.01 * 2**(n - 1))].
    assert len(waits) == 2 and 0 <= waits[0] <= 0.01 and 0 <= waits[1] <= 0.02


def test_reports_the_service_cannot_take_are_held_and_sent_in_order(receiver, caplog):
    reporter = reporter_for(receiver, retries=1, sleep=lambda _: None)
    receiver.unavailable = 4
    assert not reporter.send("metrics", {"step": 1, "loss": 2.0})
    assert not reporter.send("heartbeat", {"step": 1, "total_steps": 9})
    assert [held["type"] for held in reporter.held] == ["metrics", "heartbeat"]
    assert "1 held" in caplog.text and "2 held" in caplog.text
    reporter.heartbeat(2, 9, force=True)  # replaces the held heartbeat; the service is back
    assert reporter.held == deque()
    delivered = [(r["type"], r["payload"].get("step")) for r in receiver.reports if r["status"] == 200]
    assert delivered == [("metrics", 1), ("heartbeat", 2)]


def test_reports_never_delivered_are_logged_at_close(receiver, caplog):
    reporter = reporter_for(receiver, retries=0, deadline=0, sleep=lambda _: None)
    receiver.unavailable = 10
    reporter.checkpoint(4, "/work/step-4")
    reporter.message("hello")
    reporter.close()
    assert [r["type"] for r in receiver.reports] == ["checkpoint", "checkpoint", "checkpoint"]
    assert "2 reports (checkpoint, message) of sr_1 attempt 2 were never delivered" in caplog.text


def test_bad_token_is_not_retried_and_does_not_stop_training(receiver):
    reporter = Reporter(receiver.url, "wrong", "sr_1", 2, backoff=0.01)
    assert not reporter.send("heartbeat", {"step": 1, "total_steps": 2})
    assert [r["status"] for r in receiver.reports] == [401]


def test_an_expired_token_stops_the_attempt_like_a_fence(receiver, monkeypatch):
    """The service's own refusal of an expired token: the attempt stops now (the entrypoint exits as
    fenced off) instead of training on until its lease runs out, its artifact report lost."""
    settings = Settings(report_secret="s3cret", report_token_seconds=60)
    issued_long_ago = time.time() - 3600
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: issued_long_ago)
        old_token = settings.report_token("sr_1", 2)
    receiver.refusal = settings.check_report_token("sr_1", 2, old_token)
    reporter = reporter_for(receiver)
    with pytest.raises(TokenExpired, match="no more reports from sr_1 attempt 2: .*report token expired"):
        reporter.metrics({"step": 3, "loss": 1.0})
    assert isinstance(TokenExpired("x"), Fenced) and reporter.held == deque()
    reporter.close()  # sends nothing more and raises nothing
    assert [(r["type"], r["status"]) for r in receiver.reports] == [("metrics", 401)]
    assert "the worker stops this attempt and the dispatcher retries the stage with a new token" in receiver.refusal


def test_unreachable_service_does_not_stop_training():
    reporter = Reporter("http://127.0.0.1:9/internal/reports", TOKEN, "sr_1", 1, timeout=0.5, backoff=0.01)
    assert not reporter.send("heartbeat", {"step": 1, "total_steps": 2})


def test_heartbeats_are_throttled(receiver):
    reporter = reporter_for(receiver, heartbeat_every=60)
    for step in [1, 2, 3, 4, 4]:
        reporter.heartbeat(step, 4, force=step == 4)
    assert [r["payload"]["step"] for r in receiver.reports] == [1, 4]


def ticket_for(receiver, tmp_path, data_path="/data/sft.jsonl") -> StageLaunch:
    spec = {"name": "t", "base_model": "builtin:tiny", "stages": [{"type": "sft", "data": {"path": data_path}}]}
    return StageLaunch.model_validate_json(json.dumps(make_ticket(receiver, spec, tmp_path)))


def test_user_errors_inside_ray_train_errors_are_not_retryable(receiver, tmp_path):
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    ticket = ticket_for(receiver, tmp_path)
    data_error = DataError("/data/sft.jsonl", 4, "messages", "expected a list")
    wrapped = WorkerGroupError("worker failed", {0: UserExceptionWithTraceback(data_error, "Traceback ...")})
    assert classify(wrapped, ticket) == {
        "code": "bad_data",
        "message": "/data/sft.jsonl row 4 column 'messages': expected a list",
        "field": "stages[0].data.path",
        "retryable": False,
    }
    missing = classify(RuntimeError("launch failed"), ticket)
    assert missing["retryable"] is True and missing["message"] == "RuntimeError: launch failed"
    assert classify(MissingCheckpoint("none found"), ticket)["code"] == "missing_checkpoint"
    crash = WorkerGroupError("worker failed", {1: UserExceptionWithTraceback(OSError("disk full"), "tb")})
    assert classify(crash, ticket) == {
        "code": "stage_error", "message": "OSError: disk full", "field": None, "retryable": True,
    }


def test_bad_spec_in_the_ticket_fails_for_good_naming_the_field(receiver, tmp_path, monkeypatch):
    ticket = make_ticket(receiver, {"name": "t", "base_model": "builtin:tiny", "stages": []}, tmp_path)
    monkeypatch.setenv("ALIGN_TICKET", json.dumps(ticket))
    assert main() == 1
    (failed,) = receiver.reports
    assert failed["payload"]["code"] == "bad_spec" and failed["payload"]["field"] == "stages"
    assert failed["payload"]["retryable"] is False


def test_the_ticket_reward_model_is_optional(receiver, tmp_path):
    stages = [{"type": "sft", "data": {"path": "/d.jsonl"}}]
    spec = {"name": "t", "base_model": "builtin:tiny", "stages": stages}
    assert StageLaunch.model_validate_json(json.dumps(make_ticket(receiver, spec, tmp_path))).reward_model is None
    named = make_ticket(receiver, spec, tmp_path, reward_model="/store/t.rm/v1")
    assert StageLaunch.model_validate_json(json.dumps(named)).reward_model == "/store/t.rm/v1"


def test_missing_ticket_fields_exit_without_reporting(monkeypatch):
    monkeypatch.setenv("ALIGN_TICKET", json.dumps({"stage_run_id": "sr_1"}))
    assert main() == EXIT_BAD_TICKET
