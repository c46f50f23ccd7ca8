"""Tables of the control plane. Only :mod:`services.db.transitions` changes a stage run's state."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PENDING, QUEUED, RUNNING, RETRYING = "pending", "queued", "running", "retrying"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
FAILED_GATE = "failed_gate"
"""The error code of a stage whose evaluation gate did not pass, and the status of its job."""
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, FAILED_GATE, CANCELLED)
"""A job's status, derived from its stages (:func:`services.db.jobs.job_status`)."""
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
STAGE_STATES = (PENDING, QUEUED, RUNNING, RETRYING, *TERMINAL_STATES)
WAITING_FOR_RESOURCES = "waiting_for_resources"
PHASES = ("starting", WAITING_FOR_RESOURCES, "training", "evaluating", "publishing")
"""Phases of a running attempt, reported with its heartbeats."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_job_id() -> str:
    """``job_`` + 12 hex of milliseconds + 20 random hex: ids sort by creation time (the list cursor)."""
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def _random_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"


def new_stage_run_id() -> str:
    return _random_id("sr", 12)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict] = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: _random_id("tn"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    max_running_stages: Mapped[int | None]
    """Most stage runs of the tenant's jobs running at once (None: no limit); more wait in `queued`."""
    max_gpus: Mapped[float | None]
    """Most GPUs the tenant's running stages hold at once (`num_workers x gpus_per_worker` each)."""
    max_artifact_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Most bytes the tenant's artifacts may take in the store; at or over it, no stage of theirs starts."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: _random_id("key"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 hex of the plaintext key; the plaintext is shown once and never stored."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_job_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(80))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_fingerprint: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.index", lazy="selectin", cascade="all, delete-orphan"
    )


class StageRun(Base):
    """One stage of one job across its attempts; ``attempt`` counts claims and fences reports."""

    __tablename__ = "stage_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "index", name="uq_stage_runs_job_index"),
        Index("ix_stage_runs_state_queued_at", "state", "queued_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=new_stage_run_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]
    name: Mapped[str] = mapped_column(String(100))
    type: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int]
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    """Dispatcher holding a live Ray submission for this run; cleared once the Ray job is known to be over."""
    lease_expires_at: Mapped[datetime | None]
    submission_id: Mapped[str | None] = mapped_column(String(100))
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    """Newest checkpoint any attempt reported; kept across attempts so the next one must resume."""
    checkpoint_step: Mapped[int | None]
    progress_step: Mapped[int | None]
    total_steps: Mapped[int | None]
    phase: Mapped[str | None] = mapped_column(String(40))
    """What the running attempt is doing, as its workers last said (:data:`PHASES`); None until one says."""
    phase_since: Mapped[datetime | None]
    """When the attempt entered ``phase``."""
    queued_reason: Mapped[str | None] = mapped_column(Text)
    """Why a queued stage run waits (its tenant's quota), as the dispatcher last found; None when nothing holds it."""
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_field: Mapped[str | None] = mapped_column(String(200))
    retryable: Mapped[bool | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="stage_runs")


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    """The store's artifact id, ``<lineage>-v<version>-<12 hex>``."""
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage_run_id: Mapped[str] = mapped_column(ForeignKey("stage_runs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int]
    lineage: Mapped[str] = mapped_column(String(200))
    version: Mapped[int]
    uri: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(50))
    manifest_hash: Mapped[str] = mapped_column(String(80))
    parents: Mapped[list[str]]
    metrics: Mapped[dict[str, Any]]
    gate: Mapped[dict[str, Any] | None]
    """The stage's evaluation gate as decided (:class:`align.gates.GateResult`); None without a gate."""
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    """Bytes of the artifact's files, as its manifest lists them (counted against the tenant's quota)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage_run_id: Mapped[str | None] = mapped_column(ForeignKey("stage_runs.id", ondelete="CASCADE"))
    attempt: Mapped[int | None]
    time: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(20), default="info")
    type: Mapped[str] = mapped_column(String(20))
    """``state`` (a transition), ``metrics`` (one step's record), ``gate`` (a stage's gate decided),
    ``message`` or ``samples`` (``{"samples": [{"step", "prompt", "completion", "score"}, ...]}``)."""
    payload: Mapped[dict[str, Any]]
