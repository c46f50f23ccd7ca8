"""What the service's state adds up to, read at scrape time for ``GET /metrics`` (:mod:`services.metrics`).

Each function is one aggregate query (or, for throughput, one short query per running stage run, at most
:data:`RUNNING_LIMIT`), so a scrape costs the same whether the database holds ten jobs or ten thousand
rows of events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from services.db.models import (
    CANCELLED,
    FAILED,
    FAILED_GATE,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Event,
    StageRun,
)

RUNNING_LIMIT = 200
"""Running stage runs whose latest throughput is read per scrape (oldest first)."""
RATE_KEYS = ("tokens_per_s", "samples_per_s")
"""Throughput keys of a training metrics record (:class:`align.engine.metrics.Throughput`)."""
LATEST_RECORDS = 3
"""Metrics events read back per running stage run to find its latest training record: evaluation records
(no throughput) come at most one per logged step, and a step-0 one before the first."""


@dataclass
class DurationHistogram:
    """Finished stage runs of one type and final state: count, summed seconds, and cumulative bucket counts."""

    count: int = 0
    total_seconds: float = 0.0
    buckets: list[int] = field(default_factory=list)


def jobs_by_status(s: Session) -> dict[str, int]:
    """Jobs per derived status (:func:`services.db.jobs.job_status`), from one pass over the stage runs grouped
    by job (every job has stage runs): on a big table several times faster than deriving each job's status
    with its own look-ups (:func:`services.db.jobs.job_status_expression`)."""
    def any_in(*states: str):
        return func.max(case((StageRun.state.in_(states), 1), else_=0)) == 1

    all_succeeded = func.min(case((StageRun.state == SUCCEEDED, 1), else_=0)) == 1
    gate_failed = func.max(case(((StageRun.state == FAILED) & (StageRun.error_code == FAILED_GATE), 1), else_=0)) == 1
    status = case((gate_failed, FAILED_GATE), (any_in(FAILED), FAILED), (any_in(CANCELLED), CANCELLED),
                  (all_succeeded, SUCCEEDED),
                  (any_in(RUNNING, RETRYING, SUCCEEDED), RUNNING), else_=QUEUED)
    per_job = select(status.label("status")).group_by(StageRun.job_id).subquery()
    return dict(s.execute(select(per_job.c.status, func.count()).group_by(per_job.c.status)).all())


def stage_runs_by_type_and_state(s: Session) -> dict[tuple[str, str], int]:
    query = select(StageRun.type, StageRun.state, func.count()).group_by(StageRun.type, StageRun.state)
    return {(type_, state): count for type_, state, count in s.execute(query)}


def queue(s: Session) -> tuple[int, datetime | None]:
    """Queued stage runs, and when the one queued longest ago was queued (None when none is)."""
    count, oldest = s.execute(select(func.count(), func.min(StageRun.queued_at)).where(StageRun.state == QUEUED)).one()
    return count, oldest


def _seconds_between(s: Session, start, end):
    if s.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def stage_durations(s: Session, bounds: Sequence[float]) -> dict[tuple[str, str], DurationHistogram]:
    """Per (type, final state): finished stage runs that had started, from their last attempt's start to their
    end, with the count at or below each of ``bounds`` (seconds, ascending)."""
    seconds = _seconds_between(s, StageRun.started_at, StageRun.finished_at)
    columns = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.sum(case((seconds <= bound, 1), else_=0)) for bound in bounds]
    query = (select(StageRun.type, StageRun.state, *columns)
             .where(StageRun.state.in_(TERMINAL_STATES), StageRun.started_at.is_not(None),
                    StageRun.finished_at.is_not(None))
             .group_by(StageRun.type, StageRun.state))
    return {(type_, state): DurationHistogram(count, float(total), [int(n or 0) for n in buckets])
            for type_, state, count, total, *buckets in s.execute(query)}


def failures(s: Session) -> dict[tuple[str, str], int]:
    """Failed stage runs per (type, error code)."""
    code = func.coalesce(StageRun.error_code, "unknown")
    query = (select(StageRun.type, code, func.count()).where(StageRun.state == FAILED)
             .group_by(StageRun.type, code))
    return {(type_, error_code): count for type_, error_code, count in s.execute(query)}


def training_rates(s: Session) -> dict[str, dict[str, float]]:
    """Per stage type, the sum over its running stage runs of the throughput in each one's latest training
    metrics record (of its current attempt): ``{"sft": {"tokens_per_s": ...}, "grpo": {..., "samples_per_s"}}``.
    Types whose running stages have not logged a training record yet are absent."""
    running = s.execute(select(StageRun.id, StageRun.job_id, StageRun.type, StageRun.attempt)
                        .where(StageRun.state == RUNNING).order_by(StageRun.started_at).limit(RUNNING_LIMIT)).all()
    rates: dict[str, dict[str, float]] = {}
    for run_id, job_id, type_, attempt in running:
        query = (select(Event.payload)
                 .where(Event.job_id == job_id, Event.stage_run_id == run_id, Event.attempt == attempt,
                        Event.type == "metrics")
                 .order_by(Event.id.desc()).limit(LATEST_RECORDS))
        for payload in s.scalars(query):
            found = {key: payload[key] for key in RATE_KEYS if isinstance(payload.get(key), (int, float))}
            if found:
                totals = rates.setdefault(type_, {})
                for key, value in found.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                break
    return rates
