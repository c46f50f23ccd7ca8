"""Leases of running stage runs: who holds them, renewing them, and finding the expired and orphaned ones.

A running attempt's lease is renewed by its worker's reports (:mod:`services.db.reports`) or by the
dispatcher while Ray prepares the job; a lease that runs out is rescued by the dispatcher.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from services.db.models import CANCELLED, RUNNING, StageRun, utcnow


def renew_lease(s: Session, stage_run_id: str, attempt: int, lease_seconds: float) -> bool:
    """Extend a running attempt's lease (the dispatcher does this while Ray has not started the job)."""
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == RUNNING, StageRun.attempt == attempt)
               .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
               .execution_options(synchronize_session="fetch"))
    return s.execute(guarded).rowcount == 1


def release_cancelled(s: Session, stage_run_id: str, attempt: int) -> bool:
    """Drop a cancelled run's lease once its Ray job is known to have ended."""
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == CANCELLED, StageRun.attempt == attempt)
               .values(lease_owner=None, lease_expires_at=None, updated_at=utcnow())
               .execution_options(synchronize_session="fetch"))
    return s.execute(guarded).rowcount == 1


def running_stage_runs(s: Session) -> list[StageRun]:
    return list(s.scalars(select(StageRun).where(StageRun.state == RUNNING).order_by(StageRun.started_at)))


def cancelled_with_live_submission(s: Session) -> list[StageRun]:
    query = select(StageRun).where(StageRun.state == CANCELLED, StageRun.submission_id.is_not(None),
                                   StageRun.lease_owner.is_not(None))
    return list(s.scalars(query))
