"""A worker's reports on its running attempt: progress, metrics, checkpoints, messages, samples, the
artifact and how it failed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from services.db.artifacts import record_artifact
from services.db.events import record_event
from services.db.models import RUNNING, Event, StageRun, utcnow

REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "message", "samples", "artifact", "failed")
LEASE_REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "artifact")
"""Reports that show the attempt is alive and so renew the lease; messages and samples do not. The workers
send heartbeats from a thread of their own for the whole attempt, whatever it is doing."""
HEARTBEAT_FIELDS = {"step": "progress_step", "total_steps": "total_steps"}
"""Heartbeat fields and the columns they set; a heartbeat without them (the phase alone) leaves them be."""


def apply_report(s: Session, stage_run_id: str, attempt: int, type: str, payload: dict[str, Any], *,
                 lease_seconds: float) -> bool:
    """Record a worker report for a running attempt; False when the attempt is stale or no longer running.

    A report of one of :data:`LEASE_REPORT_TYPES` renews the lease for ``lease_seconds``. A "failed"
    report only records the error: the attempt ends when the dispatcher sees its Ray job end. A metrics
    record equal to the attempt's latest one is taken but not recorded again: the worker sends its reports
    in order and sends one again only when it did not learn that the first was taken (a connection lost
    while the service committed it).
    """
    if type not in REPORT_TYPES:
        raise ValueError(f"unknown report type {type!r}; expected one of {', '.join(REPORT_TYPES)}")
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if type in LEASE_REPORT_TYPES:
        values["lease_expires_at"] = now + timedelta(seconds=lease_seconds)
    if type == "heartbeat":
        values.update({column: payload[key] for key, column in HEARTBEAT_FIELDS.items() if key in payload})
        phase = payload.get("phase")
        if phase is not None:
            values.update(phase=phase, phase_since=case((StageRun.phase == phase, StageRun.phase_since), else_=now))
    elif type == "metrics" and isinstance(payload.get("step"), int):
        values["progress_step"] = payload["step"]
    elif type == "checkpoint":
        values.update(checkpoint_uri=payload["uri"], checkpoint_step=payload.get("step"))
    elif type == "failed":
        values.update(error_code=payload.get("code", "error"), error_message=payload.get("message"),
                      error_field=payload.get("field"), retryable=bool(payload.get("retryable", True)))
    fence = (StageRun.id == stage_run_id, StageRun.state == RUNNING, StageRun.attempt == attempt)
    earlier_phase = s.execute(select(StageRun.phase).where(*fence)).scalar_one_or_none()
    guarded = (update(StageRun).where(*fence).values(**values).returning(StageRun.job_id)
               .execution_options(synchronize_session="fetch"))
    job_id = s.execute(guarded).scalar_one_or_none()
    if job_id is None:
        return False
    if type == "heartbeat" and values.get("phase") not in (None, earlier_phase):
        record_event(s, job_id, "message", phase_event(values["phase"], payload), stage_run_id, attempt)
    if type == "metrics":
        if _latest_metrics(s, job_id, stage_run_id, attempt) != payload:
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


def _latest_metrics(s: Session, job_id: str, stage_run_id: str, attempt: int) -> dict[str, Any] | None:
    query = (select(Event.payload)
             .where(Event.job_id == job_id, Event.stage_run_id == stage_run_id, Event.attempt == attempt,
                    Event.type == "metrics")
             .order_by(Event.id.desc()).limit(1))
    return s.scalars(query).first()


def phase_event(phase: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The "message" event of an attempt that entered ``phase``; a wait for resources names what it waits for."""
    text = f"phase: {phase}"
    if payload.get("detail"):
        text += f" ({payload['detail']})"
    return {"level": "info", "text": text, "phase": phase}
