"""What one stage attempt is given (its context), what it returns, and how it starts."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import numpy as np
import torch

from align.artifacts import PublishedArtifact
from align.engine.dist import Rank, all_reduce_sum, init_distributed
from align.precision import PrecisionChoice, resolve
from align.spec import (
    DPOStage,
    GRPOStage,
    JobSpec,
    KTOStage,
    ORPOStage,
    PPOStage,
    RewardModelStage,
    SFTStage,
    SimPOStage,
)
from align.tracking import StageTracker

if TYPE_CHECKING:
    from align.evaluate_generations import HeldOutReplies

StageT = TypeVar(
    "StageT", bound=SFTStage | RewardModelStage | DPOStage | ORPOStage | SimPOStage | KTOStage | PPOStage | GRPOStage
)


@dataclass
class StageContext(Generic[StageT]):
    """Everything one stage attempt needs. Built by the local runner or by a Ray worker.

    A stage module reads it as ``StageContext[DPOStage]`` (and so on): ``ctx.stage`` is then typed as
    that stage's spec."""

    job: JobSpec
    index: int
    work_dir: Path
    """This stage's own folder: checkpoints/, metrics.jsonl, the artifact before it is published."""
    artifact_root: str
    start_policy: Path | None = None
    """Local folder of the policy this stage starts from (an earlier stage's artifact), if any."""
    parents: list[str] = field(default_factory=list)
    """Artifact ids this stage builds on, recorded in its manifest."""
    reward_model: Path | None = None
    """Local folder of the reward-model artifact the stage scores with (``reward: model``, ``eval_reward: model``)."""
    threads: int | None = None
    resume: bool = True
    """Continue from the newest complete checkpoint in ``work_dir/checkpoints`` if there is one."""
    require_checkpoint: bool = False
    """A retried attempt: finding no checkpoint is an error, never a silent restart from step 0."""
    on_metrics: Callable[[dict], None] | None = None
    on_samples: Callable[[list[dict]], None] | None = None
    """Called on the main rank with sampled completions (step, prompt, completion, score) as they are logged."""
    on_checkpoint: Callable[[int, str], None] | None = None
    """Called on every rank with (step, folder) once the checkpoint after that step is complete."""
    on_message: Callable[[str, str], None] | None = None
    """Called on the main rank with (text, level) for what the stage reports in words (level info or warning)."""
    on_phase: Callable[[str], None] | None = None
    """Called on the main rank with what the stage does now: ``training``, ``evaluating`` or ``publishing``."""
    job_id: str | None = None
    stage_run_id: str | None = None
    """The service's stage run this attempt belongs to; with ``attempt`` it makes publishing idempotent."""
    attempt: int | None = None
    precision: PrecisionChoice | None = None
    """What the stage trains in and why; set by :func:`start` from ``deepspeed.precision`` and the hardware."""
    mlflow_tracking_uri: str | None = None
    """Where a job with ``report_to: [mlflow]`` logs its runs."""
    tracker: StageTracker | None = None
    """The main rank's reporter to the job's ``report_to`` tools; opened by :func:`start`, ended by publishing."""

    @property
    def stage(self) -> StageT:
        return cast(StageT, self.job.stages[self.index])

    @property
    def name(self) -> str:
        return self.job.stage_names()[self.index]

    @property
    def lineage(self) -> str:
        return f"{self.job.name}.{self.name}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the stage loads its models in: that of the precision :func:`start` chose."""
        if self.precision is None:
            raise RuntimeError("the stage's precision is chosen in align.stages.context.start(); call it first")
        return self.precision.dtype

    def phase(self, phase: str) -> None:
        """Say through ``on_phase`` what the stage does now (the service shows it); call on every rank."""
        if self.on_phase is not None:
            self.on_phase(phase)

    def message(self, text: str, level: str = "info") -> None:
        """Report ``text`` through ``on_message`` (a job event in the service); call on the main rank."""
        if self.on_message is not None:
            self.on_message(text, level)


@dataclass
class StageResult:
    artifact: PublishedArtifact
    metrics: dict


@dataclass
class StageModels:
    """What a stage's ``evaluate(ctx, rank, models, data)`` reads: the engine training the policy (the
    reward model in an rm stage) and its tokenizer. Stages that need more extend it."""

    engine: Any
    tokenizer: Any
    packed: bool = field(default=False, kw_only=True)
    """Micro-batches are packed padding-free (``align.stages.batches``), not padded."""
    replies: HeldOutReplies | None = field(default=None, kw_only=True)
    """Samples and scores the policy's replies to the held-out prompts, when the stage does
    (:mod:`align.evaluate_generations`)."""


def start(ctx: StageContext) -> Rank:
    """Join the process group, choose the precision, seed every generator from the stage seed, and on the main
    rank open the tracker of the job's ``report_to``.

    The stage's first message says which precision it trains in and why (a warning when an explicit bf16
    runs on hardware that emulates it)."""
    rank = init_distributed(ctx.threads)
    ctx.precision = agree_on_precision(resolve(ctx.job.deepspeed.precision))
    if rank.is_main:
        ctx.message(ctx.precision.summary())
        if ctx.precision.warning:
            ctx.message(ctx.precision.warning, "warning")
    seed_everything(ctx.stage.seed)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if rank.is_main and ctx.job.report_to:
        ctx.tracker = StageTracker(job=ctx.job, stage_index=ctx.index, stage_name=ctx.name, work_dir=ctx.work_dir,
                                   job_id=ctx.job_id, mlflow_tracking_uri=ctx.mlflow_tracking_uri,
                                   warn=lambda text: ctx.message(text, "warning"))
    return rank


def agree_on_precision(choice: PrecisionChoice) -> PrecisionChoice:
    """One precision for every rank: ``auto`` falls back to fp32 on all ranks if any rank lacks native bf16."""
    if choice.requested != "auto":
        return choice
    bf16_ranks, world = all_reduce_sum([float(choice.precision == "bf16"), 1.0])
    if choice.precision == "bf16" and bf16_ranks < world:
        lacking = f"{int(world - bf16_ranks)} of {int(world)} ranks lack native bf16"
        return replace(choice, precision="fp32", reason=lacking)
    return choice


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
