"""A worker's reports on its running attempt: progress, metrics, checkpoints, messages, samples, the
artifact and how it failed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from services.db.artifacts import record_artifact
from services.db.events import record_event
from services.db.models import RUNNING, StageRun, utcnow

REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "message", "samples", "artifact", "failed")
LEASE_REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "artifact")
"""Reports that show training is moving on and so renew the lease; messages and samples do not."""


def apply_report(s: Session, stage_run_id: str, attempt: int, type: str, payload: dict[str, Any], *,
                 lease_seconds: float) -> bool:
    """Record a worker report for a running attempt; False when the attempt is stale or no longer running.

    A report of one of :data:`LEASE_REPORT_TYPES` renews the lease for ``lease_seconds``. A "failed"
    report only records the error: the attempt ends when the dispatcher sees its Ray job end.
    """
    if type not in REPORT_TYPES:
        raise ValueError(f"unknown report type {type!r}; expected one of {', '.join(REPORT_TYPES)}")
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if type in LEASE_REPORT_TYPES:
        values["lease_expires_at"] = now + timedelta(seconds=lease_seconds)
    if type == "heartbeat":
        values.update(progress_step=payload.get("step"), total_steps=payload.get("total_steps"))
    elif type == "metrics" and isinstance(payload.get("step"), int):
        values["progress_step"] = payload["step"]
    elif type == "checkpoint":
        values.update(checkpoint_uri=payload["uri"], checkpoint_step=payload.get("step"))
    elif type == "failed":
        values.update(error_code=payload.get("code", "error"), error_message=payload.get("message"),
                      error_field=payload.get("field"), retryable=bool(payload.get("retryable", True)))
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == RUNNING, StageRun.attempt == attempt)
               .values(**values).returning(StageRun.job_id)
               .execution_options(synchronize_session="fetch"))
    job_id = s.execute(guarded).scalar_one_or_none()
    if job_id is None:
        return False
    if type == "metrics":
        record_event(s, job_id, "metrics", payload, stage_run_id, attempt)
    elif type == "message":
        record_event(s, job_id, "message", payload, stage_run_id, attempt, payload.get("level", "info"))
    elif type == "samples":
        record_event(s, job_id, "samples", {"samples": list(payload.get("samples") or [])}, stage_run_id, attempt)
    elif type == "checkpoint":
        text = f"checkpoint at step {payload.get('step')}: {payload['uri']}"
        record_event(s, job_id, "message", {"level": "info", "text": text}, stage_run_id, attempt)
    elif type == "failed":
        text = f"{values['error_code']}: {values['error_message']}"
        record_event(s, job_id, "message", {**payload, "level": "error", "text": text}, stage_run_id, attempt,
                     "error")
    elif type == "artifact":
        record_artifact(s, job_id, stage_run_id, attempt, payload)
    s.flush()
    return True
