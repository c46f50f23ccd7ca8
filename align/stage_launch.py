"""The launch of one stage attempt: everything a process needs to run a stage, or one rank of it.

The dispatcher writes one per attempt for its Ray job (the ticket in ``ALIGN_TICKET``), the local
runner one per stage for torchrun's ranks; each process that runs the stage reads it once, as JSON
(``model_dump_json`` / ``model_validate_json``). :func:`align.runner.stage_context` turns it into the
stage's :class:`~align.stages.context.StageContext`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from align.spec import JobSpec


class ReportEndpoint(BaseModel):
    """Where rank 0 reports the attempt's progress, and with what token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    """The service's report endpoint (``POST /internal/reports``)."""
    token: str
    """The attempt's bearer token: ``<stage_run_id>:<attempt>`` signed with the time it was issued."""
    heartbeat_seconds: float = Field(5.0, gt=0)
    """How often the attempt's processes send a heartbeat, whatever they are doing (well inside the lease)."""
    schedule_timeout_seconds: float = Field(1800.0, gt=0)
    """How long the attempt may wait for the CPUs/GPUs it asks for before it fails with ``unschedulable``."""


class StageLaunch(BaseModel):
    """One stage attempt: the job, which stage, what it starts from, where it works and where it reports."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: JobSpec
    """The whole job spec; the stage is ``spec.stages[index]``."""
    index: int = Field(ge=0)
    """Which stage of the spec this attempt runs."""
    work_dir: Path
    """The stage's own folder: checkpoints/, metrics.jsonl, the artifact before it is published."""
    artifact_root: str
    """The artifact store the stage reads its inputs from and publishes to: a path or an fsspec URL."""
    start_policy: str | None = None
    """URI of the policy the stage starts from (an earlier stage's artifact), if any."""
    reward_model: str | None = None
    """URI of the reward model an online stage with ``reward: model`` scores with."""
    parents: list[str] = []
    """Artifact ids the stage builds on (start policy, then reward model), recorded in its manifest."""
    resume: bool = True
    """Continue from the newest complete checkpoint in ``work_dir/checkpoints`` if there is one."""
    require_checkpoint: bool = False
    """A retried attempt of a stage that reported a checkpoint: finding none is an error."""
    attempt: int = Field(1, ge=1)
    """The attempt's number, counted by the service (its fencing token); 1 for the local runner."""
    job_id: str | None = None
    """The service's job id, recorded in the artifact's manifest; None for the local runner."""
    stage_run_id: str | None = None
    """The service's stage run; None for the local runner."""
    report: ReportEndpoint | None = None
    """Where to report; None for the local runner, which takes the stage's callbacks instead."""
    mlflow_tracking_uri: str | None = None
    """Where a job with ``report_to: [mlflow]`` logs (the service's or the local environment's
    ``ALIGN_MLFLOW_TRACKING_URI``); None for other jobs."""

    @model_validator(mode="after")
    def _index_names_a_stage(self) -> StageLaunch:
        if self.index >= len(self.spec.stages):
            raise ValueError(f"index: {self.index} is past the spec's last stage ({len(self.spec.stages) - 1})")
        return self

    @property
    def name(self) -> str:
        """The stage's name in the job."""
        return self.spec.stage_names()[self.index]

    @property
    def resources(self):
        """The workers this stage runs on (:meth:`align.spec.JobSpec.stage_resources`)."""
        return self.spec.stage_resources(self.index)

    @property
    def threads(self) -> int:
        """CPU threads each rank uses: its whole CPU share, at least one."""
        return max(1, int(self.resources.cpus_per_worker))
