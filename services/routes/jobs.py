"""Jobs: submit, list, read, cancel, and follow their events and metrics."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Request, Response, Security, status
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event

from align.spec import JobSpec, SpecError, parse_spec
from services import paths
from services.db import artifacts, events, jobs, quotas
from services.db.models import TERMINAL_STATES, Tenant
from services.db.session import database_unavailable
from services.deps import FieldErrors, SessionDep, SettingsDep, TenantDep, refuse_unknown_query
from services.routes.openapi import API_KEY, NOT_FOUND, PROTECTED, WITH_BODY
from services.schemas import (
    MAX_INT32,
    EventPublic,
    JobPublic,
    JobStatus,
    Page,
    SpecCheck,
    StageMetrics,
    StageRunPublic,
)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Security(API_KEY), Depends(refuse_unknown_query)],
                   responses=PROTECTED)

SSE_KEEPALIVE_SECONDS = 15.0
SSE_BATCH = 500
JobId = Annotated[str, Path(min_length=1, description="A job id, as `POST /jobs` answered it")]
_SPEC_SCHEMA = JobSpec.model_json_schema(
    ref_template="#/paths/~1jobs/post/requestBody/content/application~1json/schema/$defs/{model}"
)


def job_public(session, job, published: dict | None = None) -> JobPublic:
    """A job row with its stages, their artifact ids and the derived status; ``published`` is
    :func:`artifacts.artifacts_for` of its stage runs when the caller has read it already."""
    if published is None:
        published = artifacts.artifacts_for(session, job.stage_runs)
    stages = []
    for run in job.stage_runs:
        artifact = published.get((run.id, run.attempt))
        stages.append(StageRunPublic.from_row(run, artifact and artifact.id, artifact and artifact.gate))
    return JobPublic(
        id=job.id,
        name=job.name,
        tenant=session.get(Tenant, job.tenant_id).name,
        status=jobs.job_status(job),
        spec=job.spec,
        spec_hash=job.spec_hash,
        idempotency_key=job.idempotency_key,
        stages=stages,
        created_at=job.created_at,
        updated_at=job.updated_at,
    )


def _owned_job(session, tenant_id: str, job_id: str):
    job = jobs.get_job(session, tenant_id, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}")
    return job


def _checked_spec(body: dict[str, Any], session, settings, tenant) -> JobSpec:
    """The parsed spec once it validates and its locations, data and artifacts pass; else FieldErrors."""
    try:
        spec = parse_spec(body)
    except SpecError as error:
        raise FieldErrors(error.errors) from None
    if problems := quotas.never_fits(tenant, spec.model_dump(mode="json")):
        raise FieldErrors(problems)
    problems = paths.check_job(
        spec,
        settings,
        lambda artifact_id: artifacts.get_artifact(session, tenant.id, artifact_id),
        base_model_of=lambda artifact: artifacts.artifact_base_model(session, artifact),
        tenant=tenant,
    )
    if problems:
        raise FieldErrors(problems)
    return spec


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    responses={200: {"model": JobPublic, "description": "Replay of an earlier request with the same Idempotency-Key"},
               **WITH_BODY},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _SPEC_SCHEMA}}}},
)
def create_job(
    body: Annotated[dict[str, Any], Body()],
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200)] = None,
) -> JobPublic:
    """Check the spec, its locations and its data, then queue the job (201); a replay answers 200."""
    spec = _checked_spec(body, session, settings, tenant)
    try:
        job, created = jobs.create_job(
            session, tenant.id, spec, idempotency_key, spec.hash(), max_attempts=settings.max_attempts
        )
    except jobs.IdempotencyConflict:
        raise FieldErrors(
            [("Idempotency-Key", f"'{idempotency_key}' was already used for a different job spec; use a new key")]
        ) from None
    if not created:
        response.status_code = status.HTTP_200_OK
    return job_public(session, job)


@router.post(
    "/validate",
    response_model=SpecCheck,
    responses=WITH_BODY,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _SPEC_SCHEMA}}}},
)
def validate_job(body: Annotated[dict[str, Any], Body()], session: SessionDep, settings: SettingsDep,
                 tenant: TenantDep) -> SpecCheck:
    """Run every check `POST /jobs` makes on a spec, without queuing a job: 200 with the spec as it would be
    stored (defaults filled in), or the same 422 `POST /jobs` would answer."""
    spec = _checked_spec(body, session, settings, tenant)
    return SpecCheck(spec=spec.model_dump(mode="json"), spec_hash=spec.hash())


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    state: Annotated[JobStatus | None, Query(description="Only jobs in this status")] = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=40, pattern="^[A-Za-z0-9_]+$",
                                        description="The `next_cursor` of the previous page")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[JobPublic]:
    """The caller's jobs, newest first."""
    rows, next_cursor = jobs.list_jobs(session, tenant.id, state, cursor, limit)
    # One read of the artifacts of every listed stage run, not one per run: the dashboard polls this list.
    published = artifacts.artifacts_for(session, [run for job in rows for run in job.stage_runs])
    return Page[JobPublic](data=[job_public(session, job, published) for job in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=NOT_FOUND)
def get_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return job_public(session, _owned_job(session, tenant.id, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=NOT_FOUND)
def cancel_job(job_id: JobId, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Cancel the job's unfinished stages; a running stage's Ray job is stopped by the dispatcher."""
    _owned_job(session, tenant.id, job_id)
    return job_public(session, jobs.cancel_job(session, tenant.id, job_id))


@router.get("/{job_id}/metrics", response_model=list[StageMetrics], responses=NOT_FOUND)
def job_metrics(job_id: JobId, session: SessionDep, tenant: TenantDep) -> list[StageMetrics]:
    """Metrics records reported by each stage, in stage order."""
    job = _owned_job(session, tenant.id, job_id)
    records = events.metrics(session, job_id)
    return [
        StageMetrics(stage_run_id=run.id, index=run.index, name=run.name, records=records.get(run.name, []))
        for run in job.stage_runs
    ]


@router.get(
    "/{job_id}/events",
    response_model=Page[EventPublic],
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON page, or a live SSE stream"},
               **NOT_FOUND},
)
def job_events(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    tenant: TenantDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_INT32, description="Return events with a larger id")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    type: Annotated[str | None, Query(pattern="^(state|message|metrics|gate|samples)$")] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Any:
    """A page of the job's events; with ``Accept: text/event-stream``, a stream that ends with the job."""
    _owned_job(session, tenant.id, job_id)
    if accept and "text/event-stream" in accept:
        start = _last_event_id(request.headers.get("last-event-id"), after)
        factory = request.app.state.session_factory
        return EventSourceResponse(_event_stream(request, factory, tenant.id, job_id, start, type))
    rows = events.list_events(session, job_id, after or 0, limit, type)
    next_cursor = str(rows[-1].id) if len(rows) == limit else None
    return Page[EventPublic](data=[EventPublic.model_validate(row) for row in rows], next_cursor=next_cursor)


def _last_event_id(header: str | None, after: int | None) -> int | None:
    """Where a resumed stream starts: the ``Last-Event-ID`` an EventSource sends back, else ``after``."""
    if not header:
        return after
    if not (header.isascii() and header.isdigit() and int(header) <= MAX_INT32):
        raise FieldErrors([("Last-Event-ID", f"{header[:40]!r} is not an event id; send an id this stream gave "
                                             f"(0..{MAX_INT32}) or leave the header out")])
    return int(header)


async def _event_stream(request: Request, session_factory, tenant_id: str, job_id: str, after, type):
    """SSE frames for new events until the job is terminal and drained.

    The stream re-reads the database when Postgres notifies that the job has new events, else every
    ``sse_poll_seconds`` (see :mod:`services.db.notify`), also while the database cannot be reached.
    """

    def poll(after_id):
        with session_factory() as session:
            # Status first: every event of a job that was already terminal is then in this read.
            job = jobs.get_job(session, tenant_id, job_id)
            finished = job is None or jobs.job_status(job) in TERMINAL_STATES
            rows = events.list_events(session, job_id, after_id or 0, SSE_BATCH, type)
            return [EventPublic.model_validate(row) for row in rows], finished

    waker = request.app.state.event_waker
    wake = waker.subscribe(job_id)
    last_sent = time.monotonic()
    try:
        while not await request.is_disconnected():
            wake.clear()  # before the read: a notification that comes during it wakes the next wait
            try:
                batch, finished = await run_in_threadpool(poll, after)
            except Exception as error:
                if not database_unavailable(error):
                    raise
                batch, finished = [], False  # the database is away: the stream stays open and reads again
            for event in batch:
                yield format_sse_event(data_str=event.model_dump_json(), event=event.type, id=str(event.id))
                after, last_sent = event.id, time.monotonic()
            if len(batch) == SSE_BATCH:
                continue
            if finished:
                yield format_sse_event(data_str='{"status": "end"}', event="end")
                return
            if time.monotonic() - last_sent > SSE_KEEPALIVE_SECONDS:
                # A comment line keeps proxies from closing a quiet stream; clients ignore it.
                yield KEEPALIVE_COMMENT
                last_sent = time.monotonic()
            await waker.wait(wake, SSE_KEEPALIVE_SECONDS)
    finally:
        waker.unsubscribe(job_id, wake)
