"""A job's event log: its stages' state changes, messages, metrics records and sampled completions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.db.models import Event, StageRun
from services.db.notify import notify_event


def record_event(s: Session, job_id: str, type: str, payload: dict, stage_run_id: str | None = None,
                 attempt: int | None = None, level: str = "info") -> None:
    """Append an event to the job's log; the job's live streams are woken when the transaction commits."""
    s.add(Event(job_id=job_id, stage_run_id=stage_run_id, attempt=attempt, type=type, level=level,
                payload=payload))
    notify_event(s, job_id)


def list_events(s: Session, job_id: str, after_id: int = 0, limit: int = 100,
                type: str | None = None) -> list[Event]:
    query = select(Event).where(Event.job_id == job_id, Event.id > after_id).order_by(Event.id).limit(limit)
    if type is not None:
        query = query.where(Event.type == type)
    return list(s.scalars(query))


def metrics(s: Session, job_id: str) -> dict[str, list[dict[str, Any]]]:
    """Metrics records per stage name, in report order, each with the attempt that reported it."""
    names = dict(s.execute(select(StageRun.id, StageRun.name).where(StageRun.job_id == job_id)).all())
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    query = select(Event).where(Event.job_id == job_id, Event.type == "metrics").order_by(Event.id)
    for event in s.scalars(query):
        records[names[event.stage_run_id]].append({**event.payload, "attempt": event.attempt})
    return records
