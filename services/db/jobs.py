"""Jobs: creating one with its stage runs, reading and listing them with their derived status, cancelling.

Each function takes a Session, flushes, and leaves the commit to the caller (``with factory.begin() as s:``).
A stage run's state changes live in :mod:`services.db.transitions`.
"""

from __future__ import annotations

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from align.spec import JobSpec
from services.db import transitions
from services.db.events import record_event
from services.db.models import (
    CANCELLED,
    FAILED,
    FAILED_GATE,
    PENDING,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Job,
    StageRun,
    utcnow,
)


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""


def create_job(s: Session, tenant_id: str, spec: JobSpec, idempotency_key: str | None,
               fingerprint: str | None, *, max_attempts: int) -> tuple[Job, bool]:
    """Create a job and its stage runs (stage 0 queued, the rest pending, each with ``max_attempts``), or
    return the job the key made.

    Raises :class:`IdempotencyConflict` when the key was used with another request fingerprint.
    """
    if idempotency_key is not None:
        existing = _job_for_key(s, tenant_id, idempotency_key, fingerprint)
        if existing is not None:
            return existing, False
    now = utcnow()
    job = Job(tenant_id=tenant_id, name=spec.name, spec=spec.model_dump(mode="json"), spec_hash=spec.hash(),
              idempotency_key=idempotency_key, request_fingerprint=fingerprint, created_at=now,
              updated_at=now)
    for index, (stage, name) in enumerate(zip(spec.stages, spec.stage_names(), strict=True)):
        job.stage_runs.append(StageRun(
            index=index, name=name, type=stage.type, state=QUEUED if index == 0 else PENDING, attempt=0,
            max_attempts=max_attempts, queued_at=now if index == 0 else None, created_at=now, updated_at=now,
        ))
    try:
        with s.begin_nested():
            s.add(job)
            s.flush()
    except IntegrityError:
        # Another request with the same key won the race: answer with its job.
        existing = _job_for_key(s, tenant_id, idempotency_key, fingerprint) if idempotency_key else None
        if existing is None:
            raise
        return existing, False
    for run in job.stage_runs:
        record_event(s, job.id, "state", {"from": None, "to": run.state, "attempt": 0}, run.id, 0)
    s.flush()
    return job, True


def _job_for_key(s: Session, tenant_id: str, key: str, fingerprint: str | None) -> Job | None:
    job = s.scalars(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)).first()
    if job is not None and job.request_fingerprint != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was already used for job {job.id} with a different request"
        )
    return job


def get_job(s: Session, tenant_id: str, job_id: str) -> Job | None:
    return s.scalars(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id)).first()


def job_status(job: Job) -> str:
    """Derived from the stages: failed_gate (a stage's gate did not pass), failed, cancelled, succeeded,
    running (work started), else queued."""
    states_now = {run.state for run in job.stage_runs}
    if any(run.state == FAILED and run.error_code == FAILED_GATE for run in job.stage_runs):
        return FAILED_GATE
    if FAILED in states_now:
        return FAILED
    if CANCELLED in states_now:
        return CANCELLED
    if states_now == {SUCCEEDED}:
        return SUCCEEDED
    if states_now & {RUNNING, RETRYING, SUCCEEDED}:
        return RUNNING
    return QUEUED


def job_status_expression():
    """:func:`job_status` as SQL, for filtering lists."""
    def has(*stage_states: str):
        return select(StageRun.id).where(StageRun.job_id == Job.id, StageRun.state.in_(stage_states)).exists()

    not_succeeded = select(StageRun.id).where(StageRun.job_id == Job.id, StageRun.state != SUCCEEDED).exists()
    gate_failed = select(StageRun.id).where(StageRun.job_id == Job.id, StageRun.state == FAILED,
                                            StageRun.error_code == FAILED_GATE).exists()
    return case((gate_failed, FAILED_GATE), (has(FAILED), FAILED), (has(CANCELLED), CANCELLED),
                (~not_succeeded, SUCCEEDED), (has(RUNNING, RETRYING, SUCCEEDED), RUNNING), else_=QUEUED)


def list_jobs(s: Session, tenant_id: str, state: str | None = None, cursor: str | None = None,
              limit: int = 50) -> tuple[list[Job], str | None]:
    """Newest first; ``next_cursor`` is the last job id of a full page (pass it back for the next one)."""
    query = select(Job).where(Job.tenant_id == tenant_id).order_by(Job.id.desc()).limit(limit + 1)
    if state is not None:
        query = query.where(job_status_expression() == state)
    if cursor is not None:
        query = query.where(Job.id < cursor)
    jobs = list(s.scalars(query))
    return jobs[:limit], (jobs[limit - 1].id if len(jobs) > limit else None)


def cancel_job(s: Session, tenant_id: str, job_id: str) -> Job | None:
    """Cancel every stage not yet ended (:func:`services.db.transitions.cancel`); a running stage's Ray job is
    left for the dispatcher to stop."""
    job = get_job(s, tenant_id, job_id)
    if job is None:
        return None
    for run_id in [run.id for run in job.stage_runs]:
        for _ in range(transitions.MOVE_TRIES):
            run = s.get(StageRun, run_id, populate_existing=True)
            if run.state in TERMINAL_STATES or transitions.cancel(s, run.id, run.state, run.attempt):
                break
    # Rows are locked stages first, job last (never the other way round), so no deadlock with a dispatcher.
    s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    s.expire(job)
    return s.get(Job, job_id)
