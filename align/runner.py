"""Run a job's stages in order on this machine, without the service.

Each stage starts from the policy the last policy stage (sft, dpo, ppo, grpo, rloo) published;
reward-model stages publish beside the chain, and online stages that score with a reward model get
the latest one. A stage with one worker runs in this process; with several it runs under torchrun,
one process per rank, each with its share of the CPU threads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from align.artifacts import ArtifactStore, PublishedArtifact
from align.engine.dist import free_port
from align.spec import MODEL_REWARD, POLICY_STAGE_TYPES, JobSpec
from align.stages.common import StageContext, StageResult


def run_stage(ctx: StageContext) -> StageResult:
    """Run one stage in this process (one rank of it, when launched by torchrun or Ray)."""
    from align.stages import dpo, grpo, ppo, rm, sft

    runs = {"sft": sft.run, "rm": rm.run, "dpo": dpo.run, "ppo": ppo.run, "grpo": grpo.run, "rloo": grpo.run}
    return runs[ctx.stage.type](ctx)


@dataclass
class StagePlan:
    """Where a stage starts: the policy it continues and the artifacts it records as parents."""

    start_policy: PublishedArtifact | None
    parents: list[str]
    reward_model: PublishedArtifact | None = None
    """The latest reward model the job trained, for online stages with ``reward: model``."""


def plan_next(plan: StagePlan, stage_type: str, published: PublishedArtifact) -> StagePlan:
    if stage_type in POLICY_STAGE_TYPES:
        return StagePlan(published, [published.artifact_id], plan.reward_model)
    if stage_type == "rm":
        return StagePlan(plan.start_policy, plan.parents, published)
    return plan


def reward_model_for(stage, plan: StagePlan, store: ArtifactStore, base_model: str) -> PublishedArtifact | None:
    """The reward model an online stage scores with: the one its spec names, else the job's latest."""
    if getattr(stage, "reward", None) != MODEL_REWARD:
        return None
    if stage.reward_model is None:
        return plan.reward_model
    artifact = store.get(stage.reward_model)
    if artifact.manifest.kind != "reward_model":
        raise ValueError(
            f"reward_model: {stage.reward_model} is an artifact of kind '{artifact.manifest.kind}', not a reward "
            "model; give artifact:<id> of an artifact an rm stage published (kind reward_model)"
        )
    if artifact.manifest.base_model != base_model:
        raise ValueError(
            f"reward_model: {stage.reward_model} was trained on base model '{artifact.manifest.base_model}' and "
            f"this job trains '{base_model}'; give a reward model trained on the same base model"
        )
    return artifact


def run_job(
    job: JobSpec,
    *,
    work_root: Path,
    artifact_root: str,
    on_metrics: Callable[[str, dict], None] | None = None,
    on_stage_end: Callable[[str, StageResult], None] | None = None,
    on_message: Callable[[str, str, str], None] | None = None,
    on_stage_start: Callable[[str, int], None] | None = None,
    resume: bool = True,
) -> list[StageResult]:
    """Run every stage of ``job`` in order. The callbacks get the stage name first: ``on_stage_start(stage,
    planned_steps)``, ``on_metrics(stage, record)``, ``on_message(stage, text, level)`` (from torchrun ranks
    too) and ``on_stage_end(stage, result)``."""
    from align.preflight import check_job, planned_steps

    check_job(job)
    store = ArtifactStore(artifact_root)
    plan = StagePlan(None, [])
    results = []
    for index, name in enumerate(job.stage_names()):
        start_dir = store.download(plan.start_policy.uri) if plan.start_policy else None
        reward_model = reward_model_for(job.stages[index], plan, store, job.base_model)
        ctx = StageContext(
            job=job,
            index=index,
            work_dir=Path(work_root) / name,
            artifact_root=artifact_root,
            start_policy=start_dir,
            parents=plan.parents + ([reward_model.artifact_id] if reward_model else []),
            reward_model=store.download(reward_model.uri) if reward_model else None,
            threads=job.resources.cpus_per_worker,
            resume=resume,
            on_metrics=(lambda record, name=name: on_metrics(name, record)) if on_metrics else None,
            on_message=(lambda text, level, name=name: on_message(name, text, level)) if on_message else None,
        )
        if on_stage_start:
            on_stage_start(name, planned_steps(job.stages[index], job.resources.num_workers))
        if job.resources.num_workers == 1:
            result = run_stage(ctx)
            gc.collect()
        else:
            result = run_stage_with_torchrun(ctx, job.resources.num_workers)
        results.append(result)
        if on_stage_end:
            on_stage_end(name, result)
        plan = plan_next(plan, job.stages[index].type, result.artifact)
    return results


def context_to_json(ctx: StageContext) -> dict:
    return {
        "job": ctx.job.model_dump(mode="json"),
        "index": ctx.index,
        "work_dir": str(ctx.work_dir),
        "artifact_root": ctx.artifact_root,
        "start_policy": str(ctx.start_policy) if ctx.start_policy else None,
        "parents": ctx.parents,
        "reward_model": str(ctx.reward_model) if ctx.reward_model else None,
        "threads": ctx.threads,
        "resume": ctx.resume,
        "require_checkpoint": ctx.require_checkpoint,
        "job_id": ctx.job_id,
    }


def context_from_json(data: dict) -> StageContext:
    from align.spec import parse_spec

    return StageContext(
        job=parse_spec(data["job"]),
        index=data["index"],
        work_dir=Path(data["work_dir"]),
        artifact_root=data["artifact_root"],
        start_policy=Path(data["start_policy"]) if data["start_policy"] else None,
        parents=data["parents"],
        reward_model=Path(data["reward_model"]) if data.get("reward_model") else None,
        threads=data["threads"],
        resume=data["resume"],
        require_checkpoint=data["require_checkpoint"],
        job_id=data["job_id"],
    )


RANK_EVENT_PREFIX = "align-event "
"""Marks the lines rank 0 prints for its metrics and messages (``align.launch``); other output is logged."""


def relay_rank_line(line: str, on_metrics: Callable[[dict], None] | None,
                    on_message: Callable[[str, str], None] | None) -> bool:
    """Hand a rank's metrics or message line to the callbacks; False for any other line, a garbled one
    (two ranks' output interleaved) included, which is logged as it is."""
    if not line.startswith(RANK_EVENT_PREFIX):
        return False
    try:
        event = json.loads(line.removeprefix(RANK_EVENT_PREFIX))
    except ValueError:
        return False
    if not isinstance(event, dict):
        return False
    if "metrics" in event and on_metrics is not None:
        on_metrics(event["metrics"])
    elif "message" in event and on_message is not None:
        on_message(event["message"], event.get("level", "info"))
    return True


def run_stage_with_torchrun(ctx: StageContext, nproc: int) -> StageResult:
    """Run one stage as ``nproc`` local ranks; rank 0 writes the published artifact's location. Its metrics and
    messages reach ``ctx.on_metrics`` / ``ctx.on_message``; the rest of the ranks' output goes to
    ``ranks.log`` in the stage's work folder (and to stdout when there are no callbacks)."""
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    context_file = ctx.work_dir / "context.json"
    context_file.write_text(json.dumps(context_to_json(ctx)))
    result_file = ctx.work_dir / "result.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, int(ctx.threads or 1))))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "align.launch", str(context_file), str(result_file),
    ]
    log_path = ctx.work_dir / "ranks.log"
    with open(log_path, "w") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if not relay_rank_line(line, ctx.on_metrics, ctx.on_message):
                log.write(line)
                if ctx.on_metrics is None and ctx.on_message is None:
                    sys.stdout.write(line)
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"stage {ctx.name}: torchrun exited with {process.returncode}; the ranks' output is in "
                           f"{log_path}, ending:\n{tail}")
    data = json.loads(result_file.read_text())
    published = ArtifactStore(ctx.artifact_root).get(data["uri"])
    return StageResult(published, data["metrics"])
