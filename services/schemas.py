"""Request and response bodies of the HTTP API.

The request body of ``POST /jobs`` is the align :class:`~align.spec.JobSpec` itself, so the API, the CLI
and the workers share one schema. Responses are built from the database rows with ``from_row``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from align.json_values import unsafe_strings
from align.spec import JobSpec

JobCreate = JobSpec

JobStatus = Literal["queued", "running", "succeeded", "failed", "failed_gate", "cancelled"]
StageState = Literal["pending", "queued", "running", "retrying", "succeeded", "failed", "cancelled"]
ReportType = Literal["heartbeat", "metrics", "checkpoint", "message", "samples", "artifact", "failed"]

T = TypeVar("T")
MAX_INT32 = 2**31 - 1
"""Largest step, attempt or event id: the database stores them as 32-bit integers."""


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


class GateOutcome(_Public):
    """A stage's evaluation gate as decided when the stage published (the spec's `stages[].gate`)."""

    metric: str = Field(min_length=1, max_length=100)
    value: float | None = None
    """The stage's final value of `metric`; null when it never measured a finite one."""
    baseline: float | None = None
    """The parent policy's value, for `min_delta_vs_parent`."""
    passed: bool
    reason: str = Field(max_length=2000)
    """What was compared with what, e.g. `eval_rewards_accuracy 0.55 < min 0.6`."""


class Progress(_Public):
    step: int | None = None
    """Last optimizer step reported by the worker."""
    total_steps: int | None = None
    """Steps the stage will run in all."""


Phase = Literal["starting", "waiting_for_resources", "training", "evaluating", "publishing"]
"""What a running attempt is doing (:data:`services.db.models.PHASES`)."""


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
    phase: Phase | None = None
    """What the running attempt is doing, as its workers last said: `starting` (Ray starts the worker
    group), `waiting_for_resources` (the cluster has not yet the CPUs/GPUs the stage asks for; see
    `ALIGN_SCHEDULE_TIMEOUT_SECONDS`), `training`, `evaluating` or `publishing`; null before the first report."""
    phase_since: datetime | None = None
    """When the attempt entered `phase`: how long it has waited for resources, for instance."""
    queued_reason: str | None = None
    """Why a queued stage waits: its tenant's quota (running stages, GPUs or artifact storage) is used up,
    e.g. `tenant acme runs 2 stages at once, its max_running_stages`; null when nothing holds it."""
    error: StageError | None
    checkpoint_step: int | None = None
    """Step of the last checkpoint a worker reported."""
    artifact_id: str | None = None
    """The artifact this stage published, once it has."""
    gate: GateOutcome | None = None
    """The stage's gate as decided when it published; a failed one ends the stage `failed` with error code
    `failed_gate` and the job `failed_gate` (the artifact is kept)."""
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, run: Any, artifact_id: str | None = None, gate: dict | None = None) -> StageRunPublic:
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
            phase=run.phase,
            phase_since=run.phase_since,
            queued_reason=run.queued_reason if run.state == "queued" else None,
            error=error,
            checkpoint_step=run.checkpoint_step,
            artifact_id=artifact_id,
            gate=gate,
            created_at=run.created_at,
            started_at=run.started_at,
            finished_at=run.finished_at,
        )


class JobPublic(_Public):
    id: str
    name: str
    tenant: str
    """The name of the tenant that owns the job (the caller's: a key sees only its tenant's jobs)."""
    status: JobStatus
    """Derived from the stages: queued, running, succeeded, failed, failed_gate (a stage's gate did not pass;
    its artifact is kept and the later stages are cancelled) or cancelled."""
    spec: dict[str, Any]
    """The job spec as submitted (after defaults were filled in)."""
    spec_hash: str
    idempotency_key: str | None = None
    stages: list[StageRunPublic]
    created_at: datetime
    updated_at: datetime


class SpecCheck(BaseModel):
    """A spec that passed every check of `POST /jobs`."""

    spec: dict[str, Any]
    """The spec as `POST /jobs` would store it, every default filled in."""
    spec_hash: str


class EventPublic(_Public):
    id: int
    """Increasing; pass the last one seen as `?after=` to read on."""
    job_id: str
    stage_run_id: str | None = None
    attempt: int | None = None
    time: datetime
    level: str
    type: str
    """`state`, `message`, `metrics`, `gate` (a stage's gate as decided: `metric`, `value`, `baseline`,
    `passed`, `reason`) or `samples` (sampled completions of an online stage)."""
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
    attempt: int = Field(ge=1, le=MAX_INT32)
    type: ReportType
    payload: dict[str, Any] = Field(default_factory=dict)
    """Its fields by type are checked by :func:`payload_problems`; other fields are kept as they are."""


_Step = Field(None, ge=0, le=MAX_INT32)


class _Payload(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Progress(_Payload):
    step: int | None = _Step
    total_steps: int | None = _Step
    phase: Phase | None = None


class _Metrics(_Payload):
    step: int | float | str | None = None

    def problems(self) -> list[tuple[str, str]]:
        if isinstance(self.step, int) and not 0 <= self.step <= MAX_INT32:
            return [("payload.step", f"{self.step} is out of range; a step lies in 0..{MAX_INT32}")]
        return []


class _Checkpoint(_Payload):
    uri: str = Field(min_length=1)
    step: int | None = _Step


class _Message(_Payload):
    level: str = Field("info", max_length=20)
    text: str | None = None


class _Artifact(_Payload):
    artifact_id: str = Field(min_length=1, max_length=200)
    uri: str = Field(min_length=1)
    lineage: str = Field(min_length=1, max_length=200)
    version: int = Field(ge=1, le=MAX_INT32)
    kind: str = Field(min_length=1, max_length=50)
    manifest_hash: str = Field(min_length=1, max_length=80)
    parents: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: GateOutcome | None = None
    size_bytes: int | None = Field(None, ge=0, le=2**63 - 1)
    """Bytes of the artifact's files (its manifest's sizes), counted against the tenant's storage quota."""


class _Failed(_Payload):
    code: str = Field("error", max_length=100)
    message: str | None = None
    field: str | None = Field(None, max_length=200)
    retryable: bool = True


class _Samples(_Payload):
    samples: list[dict[str, Any]]


_PAYLOADS: dict[str, type[_Payload]] = {
    "heartbeat": _Progress, "metrics": _Metrics, "checkpoint": _Checkpoint, "message": _Message,
    "samples": _Samples, "artifact": _Artifact, "failed": _Failed,
}


def payload_problems(report: ReportIn) -> list[tuple[str, str]]:
    """(field, problem) for each payload field of ``report`` that its type needs and that is missing, of the
    wrong type or out of range, and for strings no database can store; empty when the payload is fine."""
    unsafe = unsafe_strings(report.payload, "payload")
    if unsafe:
        return unsafe
    try:
        payload = _PAYLOADS[report.type].model_validate(report.payload)
    except ValidationError as error:
        return [(f"payload.{e['loc'][0]}",
                 f"required for a {report.type} report" if e["type"] == "missing"
                 else f"{e['msg']} (got {e['input']!r:.80})")
                for e in error.errors()]
    return payload.problems() if isinstance(payload, _Metrics) else []


class Ok(BaseModel):
    ok: bool = True


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
    """Per dependency: `ok` or why it is not."""
