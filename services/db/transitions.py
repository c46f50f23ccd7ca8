"""The stage state machine: one function per transition, each saying which state it moves from and to.

```
pending ──► queued ──► running ──► succeeded
                ▲         │  ├───► failed
                │         │  └───► cancelled
                └─ retrying ◄┘
```

Every transition is one ``UPDATE ... WHERE id AND state AND attempt``: the attempt is the fencing token,
so a stale writer (an old attempt's report, a second dispatcher) changes nothing and gets False. Each
writes a ``state`` event, flushes, and leaves the commit to the caller (``with factory.begin() as s:``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.db.events import record_event
from services.db.models import (
    CANCELLED,
    FAILED,
    PENDING,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    StageRun,
    utcnow,
)

TRANSITIONS = {
    PENDING: {QUEUED, CANCELLED},
    QUEUED: {RUNNING, CANCELLED},
    RUNNING: {SUCCEEDED, FAILED, CANCELLED, RETRYING},
    RETRYING: {QUEUED, FAILED, CANCELLED},
}
MOVE_TRIES = 5
"""Tries of a claim or a cancel when another writer moved the row in between."""
CLAIM_CANDIDATES = 50
"""Queued stage runs a claim looks at, oldest first, past those their tenants' quotas hold back."""
_REPORTED = ("error_code", "error_message", "error_field", "retryable", "lease_owner")
"""Columns a state event carries when the transition sets them."""


def submission_id_for(stage_run_id: str, attempt: int) -> str:
    return f"align-{stage_run_id}-a{attempt}"


def claim_next(s: Session, owner: str, lease_seconds: float,
               admit: Callable[[Session, StageRun], str | None] | None = None) -> StageRun | None:
    """From queued to running: the oldest queued stage run that ``admit`` lets start (its tenant's quotas;
    it returns why not), claimed by ``owner`` (see :func:`claim`). One it holds back keeps its place and
    says why (:func:`hold`)."""
    for _ in range(MOVE_TRIES):
        candidates = s.execute(
            select(StageRun.id, StageRun.attempt).where(StageRun.state == QUEUED)
            .order_by(StageRun.queued_at, StageRun.id).limit(CLAIM_CANDIDATES).with_for_update(skip_locked=True)
        ).all()
        raced = False
        for candidate in candidates:
            if admit is not None:
                run = s.get(StageRun, candidate.id, populate_existing=True)
                reason = admit(s, run)
                if reason is not None:
                    hold(s, run, reason)
                    continue
            if claim(s, candidate.id, candidate.attempt, owner, lease_seconds):
                return s.get(StageRun, candidate.id, populate_existing=True)
            raced = True
        if not raced:
            return None
    return None


def hold(s: Session, run: StageRun, reason: str) -> None:
    """A queued stage run that may not start yet: its ``queued_reason`` and, when the reason changes, a
    ``message`` event saying why it waits."""
    if run.queued_reason == reason:
        return
    s.execute(update(StageRun).where(StageRun.id == run.id, StageRun.state == QUEUED)
              .values(queued_reason=reason).execution_options(synchronize_session="fetch"))
    record_event(s, run.job_id, "message", {"level": "info", "text": f"waiting: {reason}"}, run.id, run.attempt)
    s.flush()


def claim(s: Session, stage_run_id: str, attempt: int, owner: str, lease_seconds: float) -> bool:
    """From queued to running: attempt + 1, leased to ``owner`` for ``lease_seconds``, with the new attempt's
    submission id; the earlier attempt's error, progress and phase are cleared (its checkpoint is kept)."""
    now, new_attempt = utcnow(), attempt + 1
    return _move(
        s, stage_run_id, QUEUED, attempt, RUNNING, new_attempt=new_attempt, lease_owner=owner,
        lease_expires_at=now + timedelta(seconds=lease_seconds), started_at=now, finished_at=None,
        submission_id=submission_id_for(stage_run_id, new_attempt), queued_reason=None, error_code=None,
        error_message=None,
        error_field=None, retryable=None, progress_step=None, total_steps=None, phase=None, phase_since=None,
    ) is not None


def succeed(s: Session, stage_run_id: str, attempt: int) -> bool:
    """From running to succeeded: the lease is dropped and the job's next stage queued (:func:`queue_next`)."""
    moved = _move(s, stage_run_id, RUNNING, attempt, SUCCEEDED, finished_at=utcnow(), lease_owner=None,
                  lease_expires_at=None)
    if moved is None:
        return False
    queue_next(s, *moved)
    return True


def fail(s: Session, stage_run_id: str, attempt: int, code: str, message: str, field: str | None = None,
         retryable: bool = False) -> bool:
    """From running to failed, with the error: the lease is dropped and the job's later stages cancelled
    (:func:`cancel_later`)."""
    moved = _move(s, stage_run_id, RUNNING, attempt, FAILED, finished_at=utcnow(), lease_owner=None,
                  lease_expires_at=None, **_error(code, message, field, retryable))
    if moved is None:
        return False
    cancel_later(s, *moved)
    return True


def retry(s: Session, stage_run_id: str, attempt: int, code: str, message: str, field: str | None = None) -> bool:
    """From running to retrying, with the (retryable) error; :func:`requeue` follows."""
    return _move(s, stage_run_id, RUNNING, attempt, RETRYING, **_error(code, message, field, True)) is not None


def requeue(s: Session, stage_run_id: str, attempt: int) -> bool:
    """From retrying to queued: the lease is dropped; the next claim counts the attempt up."""
    return _move(s, stage_run_id, RETRYING, attempt, QUEUED, queued_at=utcnow(), lease_owner=None,
                 lease_expires_at=None) is not None


def cancel(s: Session, stage_run_id: str, from_state: str, attempt: int) -> bool:
    """From pending, queued, running or retrying to cancelled: the job's later stages are cancelled too.

    A run cancelled while running keeps its lease until the dispatcher has stopped its Ray job
    (:func:`services.db.leases.release_cancelled`).
    """
    lease = {} if from_state == RUNNING else {"lease_owner": None, "lease_expires_at": None}
    moved = _move(s, stage_run_id, from_state, attempt, CANCELLED, finished_at=utcnow(), error_code="cancelled",
                  **lease)
    if moved is None:
        return False
    cancel_later(s, *moved)
    return True


def queue_next(s: Session, job_id: str, index: int) -> None:
    """From pending to queued: the stage after ``index`` in the job, if it is pending."""
    query = select(StageRun).where(StageRun.job_id == job_id, StageRun.state == PENDING,
                                   StageRun.index == index + 1)
    for run in s.scalars(query).all():
        _move(s, run.id, PENDING, run.attempt, QUEUED, queued_at=utcnow())


def cancel_later(s: Session, job_id: str, index: int) -> None:
    """From pending to cancelled: every stage after ``index`` in the job that has not started."""
    query = select(StageRun).where(StageRun.job_id == job_id, StageRun.state == PENDING, StageRun.index > index)
    for run in s.scalars(query.order_by(StageRun.index)).all():
        _move(s, run.id, PENDING, run.attempt, CANCELLED, finished_at=utcnow(), lease_owner=None,
              lease_expires_at=None)


def fail_attempt(s: Session, stage_run_id: str, attempt: int, code: str, message: str,
                 field: str | None = None, retryable: bool = True) -> str | None:
    """End a running attempt that failed: :func:`retry` then :func:`requeue` while attempts remain, else
    :func:`fail`.

    Returns the state the run ended in (queued or failed), or None when the attempt was stale.
    """
    run = s.get(StageRun, stage_run_id, populate_existing=True)
    if run is None or run.state != RUNNING or run.attempt != attempt:
        return None
    if retryable and attempt < run.max_attempts:
        if not retry(s, stage_run_id, attempt, code, message, field):
            return None
        requeue(s, stage_run_id, attempt)
        return QUEUED
    if retryable:
        message = f"{message} (gave up after {attempt} of {run.max_attempts} attempts)"
    return FAILED if fail(s, stage_run_id, attempt, code, message, field, retryable) else None


def _error(code: str, message: str, field: str | None, retryable: bool) -> dict[str, Any]:
    return {"error_code": code, "error_message": message, "error_field": field, "retryable": retryable}


def _move(s: Session, stage_run_id: str, from_state: str, attempt: int, to_state: str, *,
          new_attempt: int | None = None, **columns: Any) -> tuple[str, int] | None:
    """The guarded update of one transition and its ``state`` event; ``(job_id, index)`` of the moved run,
    or None when the run was not in ``from_state`` at ``attempt``."""
    if to_state not in TRANSITIONS.get(from_state, ()):
        raise ValueError(f"no transition from {from_state!r} to {to_state!r}")
    new_attempt = attempt if new_attempt is None else new_attempt
    values = {"state": to_state, "attempt": new_attempt, "updated_at": utcnow(), **columns}
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == from_state, StageRun.attempt == attempt)
               .values(**values).returning(StageRun.job_id, StageRun.index)
               .execution_options(synchronize_session="fetch"))
    row = s.execute(guarded).one_or_none()
    if row is None:
        return None
    job_id, index = row
    payload = {"from": from_state, "to": to_state, "attempt": new_attempt}
    payload.update({key: columns[key] for key in _REPORTED if columns.get(key) is not None})
    level = {FAILED: "error", RETRYING: "warning"}.get(to_state, "info")
    record_event(s, job_id, "state", payload, stage_run_id, new_attempt, level)
    s.flush()
    return job_id, index
