"""Request and response bodies of the HTTP API.

The request body of ``POST /jobs`` is the align :class:`~align.spec.JobSpec` itself, so the API, the CLI
and the workers share one schema. Responses are built from the database rows with ``from_row``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from align.spec import JobSpec

JobCreate = JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = JobStatus.__args__
StageState = Literal["pending", "queued", "running", "retrying", "succeeded", "failed", "cancelled"]
ReportType = Literal["heartbeat", "metrics", "checkpoint", "message", "samples", "artifact", "failed"]

T = TypeVar("T")


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True, use_attribute_docstrings=True)


class FieldError(BaseModel):
    field: str
    """Where the problem is, e.g. `stages[1].data.path` or `Idempotency-Key`."""
    message: str
    """What is wrong and what would be accepted."""


class ErrorBody(BaseModel):
    """The body of every 422: one entry per problem."""

    detail: list[FieldError]


class ErrorMessage(BaseModel):
    """The body of a 401, 404 or 409: what is wrong, for people."""

    detail: str


class Progress(_Public):
    step: int | None = None
    """Last optimizer step reported by the worker."""
    total_steps: int | None = None
    """Steps the stage will run in all."""


class StageError(_Public):
    code: str | None = None
    """Machine-readable error code, e.g. `data_error`, `worker_lost`."""
    message: str | None = None
    """What went wrong, for people."""
    field: str | None = None
    """The spec field at fault, when one is."""
    retryable: bool | None = None
    """Whether the failure was considered worth another attempt."""


class StageRunPublic(_Public):
    id: str
    index: int
    name: str
    type: str
    state: StageState
    attempt: int
    """Attempts started so far (0 until the stage is first claimed)."""
    max_attempts: int
    progress: Progress
    error: StageError | None
    checkpoint_step: int | None = None
    """Step of the last checkpoint a worker reported."""
    artifact_id: str | None = None
    """The artifact this stage published, once it has."""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, run: Any, artifact_id: str | None = None) -> StageRunPublic:
        error = None
        if run.error_code or run.error_message:
            error = StageError(
                code=run.error_code, message=run.error_message, field=run.error_field, retryable=run.retryable
            )
        return cls(
            id=run.id,
            index=run.index,
            name=run.name,
            type=run.type,
            state=run.state,
            attempt=run.attempt,
            max_attempts=run.max_attempts,
            progress=Progress(step=run.progress_step, total_steps=run.total_steps),
            error=error,
            checkpoint_step=run.checkpoint_step,
            artifact_id=artifact_id,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
        )


class JobPublic(_Public):
    id: str
    name: str
    status: JobStatus
    """Derived from the stages: queued, running, succeeded, failed or cancelled."""
    spec: dict[str, Any]
    """The job spec as submitted (after defaults were filled in)."""
    spec_hash: str
    idempotency_key: str | None = None
    stages: list[StageRunPublic]
    created_at: datetime
    updated_at: datetime


class EventPublic(_Public):
    id: int
    """Increasing; pass the last one seen as `?after=` to read on."""
    job_id: str
    stage_run_id: str | None = None
    attempt: int | None = None
    time: datetime
    level: str
    type: str
    """`state`, `message`, `metrics` or `samples` (sampled completions of an online stage)."""
    payload: dict[str, Any]


class StageMetrics(BaseModel):
    stage_run_id: str
    index: int
    name: str
    records: list[dict[str, Any]]
    """Metrics records in the order they were reported (each has `step`)."""


class ArtifactPublic(_Public):
    id: str
    job_id: str | None = None
    stage_run_id: str | None = None
    attempt: int | None = None
    lineage: str
    version: int
    uri: str
    kind: str
    manifest_hash: str
    parents: list[str]
    metrics: dict[str, Any]
    created_at: datetime
    manifest: dict[str, Any] | None = None
    """The artifact's manifest.json as stored (files with sha256 and size, lineage, metrics, ...)."""


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None = None
    """Pass as `?cursor=` (jobs) or `?after=` (events) for the next page; null on the last page."""


class ReportIn(BaseModel):
    """A worker's report on its stage attempt (see the contract in docs)."""

    model_config = ConfigDict(extra="forbid")

    stage_run_id: str = Field(min_length=1, max_length=64)
    attempt: int = Field(ge=1)
    type: ReportType
    payload: dict[str, Any] = Field(default_factory=dict)


class Ok(BaseModel):
    ok: bool = True


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    """Per dependency: `ok` or why it is not."""
