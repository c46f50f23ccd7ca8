"""The only functions that change a stage run's state, and the queries beside them.

Each function takes a Session, flushes, and leaves the commit to the caller (``with factory.begin() as s:``).
Every state change is ``UPDATE ... WHERE id AND state AND attempt``: the attempt is the fencing token,
so a stale writer (an old attempt's report, a second dispatcher) changes nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import case, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from align.spec import MODEL_REWARD, POLICY_STAGE_TYPES, JobSpec
from services.db.models import (
    CANCELLED,
    FAILED,
    PENDING,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    ApiKey,
    Artifact,
    Event,
    Job,
    StageRun,
    Tenant,
    utcnow,
)
from services.db.notify import notify_event

TRANSITIONS = {
    PENDING: {QUEUED, CANCELLED},
    QUEUED: {RUNNING, CANCELLED},
    RUNNING: {SUCCEEDED, FAILED, CANCELLED, RETRYING},
    RETRYING: {QUEUED, FAILED, CANCELLED},
}
REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "message", "samples", "artifact", "failed")
LEASE_REPORT_TYPES = ("heartbeat", "metrics", "checkpoint", "artifact")
"""Reports that show training is moving on and so renew the lease; messages and samples do not."""
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""


def _settings():
    from services.settings import get_settings

    return get_settings()


def submission_id_for(stage_run_id: str, attempt: int) -> str:
    return f"align-{stage_run_id}-a{attempt}"


def _event(s: Session, job_id: str, type: str, payload: dict, stage_run_id: str | None = None,
           attempt: int | None = None, level: str = "info") -> None:
    s.add(Event(job_id=job_id, stage_run_id=stage_run_id, attempt=attempt, type=type, level=level,
                payload=payload))
    notify_event(s, job_id)


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def create_tenant(s: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    s.add(tenant)
    s.flush()
    return tenant


def create_api_key(s: Session, tenant_id: str, name: str, plaintext: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the tenant; the plaintext is returned once and only its sha256 is stored."""
    plaintext = plaintext or "align_" + secrets.token_urlsafe(32)
    key = ApiKey(tenant_id=tenant_id, name=name, key_hash=hash_key(plaintext))
    s.add(key)
    s.flush()
    return key, plaintext


def tenant_for_key(s: Session, plaintext: str) -> Tenant | None:
    query = (select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
             .where(ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None)))
    return s.scalars(query).first()


def create_job(s: Session, tenant_id: str, spec: JobSpec, idempotency_key: str | None,
               fingerprint: str | None, max_attempts: int | None = None) -> tuple[Job, bool]:
    """Create a job and its stage runs (stage 0 queued, the rest pending), or return the job the key made.

    Raises :class:`IdempotencyConflict` when the key was used with another request fingerprint.
    """
    if idempotency_key is not None:
        existing = _job_for_key(s, tenant_id, idempotency_key, fingerprint)
        if existing is not None:
            return existing, False
    max_attempts = max_attempts or _settings().max_attempts
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
        _event(s, job.id, "state", {"from": None, "to": run.state, "attempt": 0}, run.id, 0)
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
    """Derived from the stages: failed, cancelled, succeeded, running (work started), else queued."""
    states = {run.state for run in job.stage_runs}
    if FAILED in states:
        return FAILED
    if CANCELLED in states:
        return CANCELLED
    if states == {SUCCEEDED}:
        return SUCCEEDED
    if states & {RUNNING, RETRYING, SUCCEEDED}:
        return RUNNING
    return QUEUED


def job_updated_at(job: Job) -> datetime:
    """Latest change to the job or any of its stage runs."""
    return max([job.updated_at, *(run.updated_at for run in job.stage_runs)])


def job_status_expression():
    """:func:`job_status` as SQL, for filtering lists."""
    def has(*states: str):
        return select(StageRun.id).where(StageRun.job_id == Job.id, StageRun.state.in_(states)).exists()

    not_succeeded = select(StageRun.id).where(StageRun.job_id == Job.id, StageRun.state != SUCCEEDED).exists()
    return case((has(FAILED), FAILED), (has(CANCELLED), CANCELLED), (~not_succeeded, SUCCEEDED),
                (has(RUNNING, RETRYING, SUCCEEDED), RUNNING), else_=QUEUED)


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


def transition(s: Session, stage_run_id: str, expected_state: str, attempt: int, new_state: str,
               *, new_attempt: int | None = None, **fields: Any) -> bool:
    """Move a stage run from ``expected_state`` at ``attempt`` to ``new_state``; False if it was not there.

    ``fields`` are other columns to set; ``new_attempt`` replaces the attempt (claims count it up).

    Success queues the next pending stage; failure or cancellation cancels the later ones.
    A run cancelled while running keeps its lease until the dispatcher has stopped its Ray job.
    """
    if new_state not in TRANSITIONS.get(expected_state, ()):
        raise ValueError(f"no transition from {expected_state!r} to {new_state!r}")
    now = utcnow()
    new_attempt = attempt if new_attempt is None else new_attempt
    values: dict[str, Any] = {"state": new_state, "attempt": new_attempt, "updated_at": now, **fields}
    if new_state == QUEUED:
        values.setdefault("queued_at", now)
    if new_state in TERMINAL_STATES:
        values.setdefault("finished_at", now)
        if not (new_state == CANCELLED and expected_state == RUNNING):
            values.update(lease_owner=None, lease_expires_at=None)
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == expected_state,
                      StageRun.attempt == attempt)
               .values(**values).returning(StageRun.job_id, StageRun.index)
               .execution_options(synchronize_session="fetch"))
    row = s.execute(guarded).one_or_none()
    if row is None:
        return False
    job_id, index = row
    payload = {"from": expected_state, "to": new_state, "attempt": new_attempt}
    reported = ("error_code", "error_message", "error_field", "retryable", "lease_owner")
    payload.update({k: fields[k] for k in reported if fields.get(k) is not None})
    level = {FAILED: "error", RETRYING: "warning"}.get(new_state, "info")
    _event(s, job_id, "state", payload, stage_run_id, new_attempt, level)
    if new_state == SUCCEEDED:
        _move_later(s, job_id, index, QUEUED, only_next=True)
    elif new_state in (FAILED, CANCELLED):
        _move_later(s, job_id, index, CANCELLED, only_next=False)
    s.flush()
    return True


def _move_later(s: Session, job_id: str, index: int, new_state: str, only_next: bool) -> None:
    query = select(StageRun).where(StageRun.job_id == job_id, StageRun.state == PENDING)
    query = query.where(StageRun.index == index + 1) if only_next else query.where(StageRun.index > index)
    for run in s.scalars(query.order_by(StageRun.index)).all():
        transition(s, run.id, PENDING, run.attempt, new_state)


def cancel_job(s: Session, tenant_id: str, job_id: str) -> Job | None:
    """Cancel every stage not yet ended; a running stage's Ray job is left for the dispatcher to stop."""
    job = get_job(s, tenant_id, job_id)
    if job is None:
        return None
    for run_id in [run.id for run in job.stage_runs]:
        for _ in range(5):
            run = s.get(StageRun, run_id, populate_existing=True)
            if run.state in TERMINAL_STATES or transition(s, run.id, run.state, run.attempt, CANCELLED,
                                                          error_code="cancelled"):
                break
    # Rows are locked stages first, job last (never the other way round), so no deadlock with a dispatcher.
    s.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    s.expire(job)
    return s.get(Job, job_id)


def claim_next(s: Session, owner: str, lease_seconds: float) -> StageRun | None:
    """Take the oldest queued stage run: queued -> running, attempt + 1, leased to ``owner``."""
    for _ in range(5):
        candidate = s.execute(
            select(StageRun.id, StageRun.attempt).where(StageRun.state == QUEUED)
            .order_by(StageRun.queued_at, StageRun.id).limit(1).with_for_update(skip_locked=True)
        ).first()
        if candidate is None:
            return None
        now, attempt = utcnow(), candidate.attempt + 1
        claimed = transition(
            s, candidate.id, QUEUED, candidate.attempt, RUNNING, new_attempt=attempt, lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds), started_at=now, finished_at=None,
            submission_id=submission_id_for(candidate.id, attempt), error_code=None, error_message=None,
            error_field=None, retryable=None, progress_step=None, total_steps=None,
        )
        if claimed:
            return s.get(StageRun, candidate.id, populate_existing=True)
    return None


def fail_attempt(s: Session, stage_run_id: str, attempt: int, code: str, message: str,
                 field: str | None = None, retryable: bool = True) -> str | None:
    """End a running attempt that failed: retrying -> queued while attempts remain, else failed.

    Returns the state the run ended in, or None when the attempt was stale.
    """
    run = s.get(StageRun, stage_run_id, populate_existing=True)
    if run is None or run.state != RUNNING or run.attempt != attempt:
        return None
    error = {"error_code": code, "error_message": message, "error_field": field, "retryable": retryable}
    if retryable and attempt < run.max_attempts:
        if not transition(s, stage_run_id, RUNNING, attempt, RETRYING, **error):
            return None
        transition(s, stage_run_id, RETRYING, attempt, QUEUED, lease_owner=None, lease_expires_at=None)
        return QUEUED
    if retryable:
        error["error_message"] = f"{message} (gave up after {attempt} of {run.max_attempts} attempts)"
    return FAILED if transition(s, stage_run_id, RUNNING, attempt, FAILED, **error) else None


def apply_report(s: Session, stage_run_id: str, attempt: int, type: str, payload: dict[str, Any],
                 lease_seconds: float | None = None) -> bool:
    """Record a worker report for a running attempt; False when the attempt is stale or no longer running."""
    if type not in REPORT_TYPES:
        raise ValueError(f"unknown report type {type!r}; expected one of {', '.join(REPORT_TYPES)}")
    now = utcnow()
    values: dict[str, Any] = {"updated_at": now}
    if type in LEASE_REPORT_TYPES:
        lease = lease_seconds if lease_seconds is not None else _settings().lease_seconds
        values["lease_expires_at"] = now + timedelta(seconds=lease)
    if type == "heartbeat":
        values.update(progress_step=payload.get("step"), total_steps=payload.get("total_steps"))
    elif type == "metrics" and isinstance(payload.get("step"), int):
        values["progress_step"] = payload["step"]
    elif type == "checkpoint":
        values.update(checkpoint_uri=payload["uri"], checkpoint_step=payload.get("step"))
    elif type == "failed":
        values.update(error_code=payload.get("code", "error"), error_message=payload.get("message"),
                      error_field=payload.get("field"), retryable=bool(payload.get("retryable", True)))
    guarded = (update(StageRun)
               .where(StageRun.id == stage_run_id, StageRun.state == RUNNING, StageRun.attempt == attempt)
               .values(**values).returning(StageRun.job_id)
               .execution_options(synchronize_session="fetch"))
    job_id = s.execute(guarded).scalar_one_or_none()
    if job_id is None:
        return False
    if type == "metrics":
        _event(s, job_id, "metrics", payload, stage_run_id, attempt)
    elif type == "message":
        _event(s, job_id, "message", payload, stage_run_id, attempt, payload.get("level", "info"))
    elif type == "samples":
        _event(s, job_id, "samples", {"samples": list(payload.get("samples") or [])}, stage_run_id, attempt)
    elif type == "checkpoint":
        text = f"checkpoint at step {payload.get('step')}: {payload['uri']}"
        _event(s, job_id, "message", {"level": "info", "text": text}, stage_run_id, attempt)
    elif type == "failed":
        text = f"{values['error_code']}: {values['error_message']}"
        _event(s, job_id, "message", {**payload, "level": "error", "text": text}, stage_run_id, attempt,
               "error")
    elif type == "artifact":
        _record_artifact(s, job_id, stage_run_id, attempt, payload)
    s.flush()
    return True


def _record_artifact(s: Session, job_id: str, stage_run_id: str, attempt: int, payload: dict) -> None:
    if s.get(Artifact, payload["artifact_id"]) is None:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
        s.add(Artifact(
            id=payload["artifact_id"], tenant_id=tenant_id, job_id=job_id, stage_run_id=stage_run_id,
            attempt=attempt, lineage=payload["lineage"], version=payload["version"], uri=payload["uri"],
            kind=payload["kind"], manifest_hash=payload["manifest_hash"],
            parents=list(payload.get("parents", [])), metrics=dict(payload.get("metrics") or {}),
        ))
    text = f"published artifact {payload['artifact_id']}"
    _event(s, job_id, "message", {"level": "info", "text": text, "artifact_id": payload["artifact_id"]},
           stage_run_id, attempt)


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


def running_owned_by(s: Session, owner: str) -> list[StageRun]:
    return [run for run in running_stage_runs(s) if run.lease_owner == owner]


def expired_leases(s: Session, now: datetime) -> list[StageRun]:
    query = select(StageRun).where(StageRun.state == RUNNING, StageRun.lease_expires_at < now)
    return list(s.scalars(query))


def cancelled_with_live_submission(s: Session) -> list[StageRun]:
    query = select(StageRun).where(StageRun.state == CANCELLED, StageRun.submission_id.is_not(None),
                                   StageRun.lease_owner.is_not(None))
    return list(s.scalars(query))


def artifact_for(s: Session, stage_run_id: str, attempt: int) -> Artifact | None:
    query = select(Artifact).where(Artifact.stage_run_id == stage_run_id, Artifact.attempt == attempt)
    return s.scalars(query.order_by(Artifact.created_at.desc())).first()


class StageInputs(NamedTuple):
    start_policy: str | None
    """URI of the policy the stage starts from."""
    parents: list[str]
    """Artifact ids the stage builds on: the policy, then the reward model."""
    reward_model: str | None
    """URI of the reward model an online stage with ``reward: model`` scores with."""


class MissingInput(Exception):
    """A stage's input artifact is not in the database; ``field`` names the spec field that asks for it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _latest_artifact_of(s: Session, run: StageRun, stage_types: tuple[str, ...]) -> Artifact | None:
    """The artifact of the latest succeeded stage of one of ``stage_types`` before ``run`` in its job."""
    query = (select(Artifact).join(StageRun, StageRun.id == Artifact.stage_run_id)
             .where(StageRun.job_id == run.job_id, StageRun.index < run.index, StageRun.state == SUCCEEDED,
                    StageRun.type.in_(stage_types), Artifact.attempt == StageRun.attempt)
             .order_by(StageRun.index.desc()).limit(1))
    return s.scalars(query).first()


def stage_inputs(s: Session, run: StageRun) -> StageInputs:
    """What a stage starts from: the policy (the latest succeeded policy stage before it), the reward model
    when its spec has ``reward: model``, and the parent ids (policy, then reward model).

    The reward model is the artifact the stage's ``reward_model: artifact:<id>`` names (among the job's
    tenant's artifacts), else the latest succeeded ``rm`` stage's artifact before it in the job.
    Raises :class:`MissingInput` when a reward model is needed and none is found.
    """
    policy = _latest_artifact_of(s, run, POLICY_STAGE_TYPES)
    parents = [policy.id] if policy else []
    job = s.get(Job, run.job_id)
    stage = job.spec["stages"][run.index]
    reward_model = None
    if stage.get("reward") == MODEL_REWARD:
        field = f"stages[{run.index}].reward_model"
        named = stage.get("reward_model")
        if named:
            reward_model = get_artifact(s, job.tenant_id, named.removeprefix("artifact:"))
            if reward_model is None:
                raise MissingInput(field, f"no artifact '{named}' among the artifacts of this job's tenant")
        else:
            reward_model = _latest_artifact_of(s, run, ("rm",))
            if reward_model is None:
                raise MissingInput(field, "no rm stage before this one has published a reward model")
        parents.append(reward_model.id)
    return StageInputs(policy.uri if policy else None, parents, reward_model.uri if reward_model else None)


def artifact_base_model(s: Session, artifact: Artifact) -> str | None:
    """The base model the artifact's job trained (from the job's spec)."""
    job = s.get(Job, artifact.job_id)
    return job.spec.get("base_model") if job is not None else None


def get_artifact(s: Session, tenant_id: str, artifact_id: str) -> Artifact | None:
    query = select(Artifact).where(Artifact.id == artifact_id, Artifact.tenant_id == tenant_id)
    return s.scalars(query).first()


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
