"""Artifact rows: recording what an attempt published, finding them, and a stage's input artifacts."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from align import lineage
from align.lineage import InputArtifact, StageInputs
from align.spec import JobSpec
from services.db.events import record_event
from services.db.models import SUCCEEDED, Artifact, Job, StageRun

logger = logging.getLogger(__name__)


def record_artifact(s: Session, job_id: str, stage_run_id: str, attempt: int, payload: dict) -> Artifact:
    """Store the artifact an attempt reported, once per (stage run, attempt): a repeated report, or a second
    publish by the same attempt, returns the row already there and adds only its message event."""
    artifact = artifact_for(s, stage_run_id, attempt) or s.get(Artifact, payload["artifact_id"])
    if artifact is None:
        tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == job_id))
        artifact = Artifact(
            id=payload["artifact_id"], tenant_id=tenant_id, job_id=job_id, stage_run_id=stage_run_id,
            attempt=attempt, lineage=payload["lineage"], version=payload["version"], uri=payload["uri"],
            kind=payload["kind"], manifest_hash=payload["manifest_hash"],
            parents=list(payload.get("parents", [])), metrics=dict(payload.get("metrics") or {}),
            gate=payload.get("gate"), size_bytes=payload.get("size_bytes"),
        )
        s.add(artifact)
        if artifact.gate is not None:
            gate = artifact.gate
            record_event(s, job_id, "gate", gate, stage_run_id, attempt, "info" if gate["passed"] else "error")
    elif artifact.id != payload["artifact_id"]:
        logger.warning("%s attempt %d reported artifact %s after %s; keeping the first", stage_run_id, attempt,
                       payload["artifact_id"], artifact.id)
    text = f"published artifact {artifact.id}"
    record_event(s, job_id, "message", {"level": "info", "text": text, "artifact_id": artifact.id},
                 stage_run_id, attempt)
    return artifact


def artifact_for(s: Session, stage_run_id: str, attempt: int) -> Artifact | None:
    query = select(Artifact).where(Artifact.stage_run_id == stage_run_id, Artifact.attempt == attempt)
    return s.scalars(query.order_by(Artifact.created_at.desc())).first()


def artifacts_for(s: Session, runs: list[StageRun]) -> dict[tuple[str, int], Artifact]:
    """``{(stage run id, attempt): artifact}`` for the current attempt of each run, as :func:`artifact_for`
    finds them (the newest of an attempt), in one statement."""
    wanted = {(run.id, run.attempt) for run in runs if run.attempt}
    if not wanted:
        return {}
    query = select(Artifact).where(Artifact.stage_run_id.in_({run_id for run_id, _ in wanted}))
    found: dict[tuple[str, int], Artifact] = {}
    for artifact in s.scalars(query.order_by(Artifact.created_at)):
        if (artifact.stage_run_id, artifact.attempt) in wanted:
            found[artifact.stage_run_id, artifact.attempt] = artifact  # a newer one replaces an older
    return found


def get_artifact(s: Session, tenant_id: str, artifact_id: str) -> Artifact | None:
    query = select(Artifact).where(Artifact.id == artifact_id, Artifact.tenant_id == tenant_id)
    return s.scalars(query).first()


def artifact_base_model(s: Session, artifact: Artifact) -> str | None:
    """The base model the artifact's job trained (from the job's spec)."""
    job = s.get(Job, artifact.job_id)
    return job.spec.get("base_model") if job is not None else None


def input_artifact(s: Session, artifact: Artifact) -> InputArtifact:
    """An artifact row as :func:`align.lineage.stage_inputs` sees it."""
    return InputArtifact(artifact.id, artifact.uri, artifact.kind, artifact_base_model(s, artifact))


def published_before(s: Session, run: StageRun) -> dict[int, InputArtifact]:
    """The artifact each succeeded stage before ``run`` in its job published, by stage index (the
    succeeded attempt's; an earlier attempt's is never used)."""
    query = (select(StageRun.index, Artifact).join(StageRun, StageRun.id == Artifact.stage_run_id)
             .where(StageRun.job_id == run.job_id, StageRun.index < run.index, StageRun.state == SUCCEEDED,
                    Artifact.attempt == StageRun.attempt)
             .order_by(StageRun.index, Artifact.created_at))
    return {index: InputArtifact(artifact.id, artifact.uri, artifact.kind) for index, artifact in s.execute(query)}


def stage_inputs(s: Session, run: StageRun, spec: JobSpec) -> StageInputs:
    """What ``run`` starts from (:func:`align.lineage.stage_inputs`), its job's spec being ``spec``; a named
    reward model is looked up among the artifacts of the job's tenant.

    Raises :class:`align.lineage.MissingInput` when a reward model is needed and none fits.
    """
    tenant_id = s.scalar(select(Job.tenant_id).where(Job.id == run.job_id))

    def find(artifact_id: str) -> InputArtifact | None:
        artifact = get_artifact(s, tenant_id, artifact_id)
        return input_artifact(s, artifact) if artifact is not None else None

    return lineage.stage_inputs(spec, run.index, published_before(s, run), find)
