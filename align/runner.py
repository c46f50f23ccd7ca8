"""Run a job's stages in order on this machine, without the service.

Each stage starts from the policy the last policy stage (sft, dpo, grpo, rloo) published; reward-model stages
publish beside the chain. A stage with one worker runs in this process; with several it runs under
torchrun, one process per rank, each with its share of the CPU threads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from align.artifacts import ArtifactStore, PublishedArtifact
from align.engine.dist import free_port
from align.spec import POLICY_STAGE_TYPES, JobSpec
from align.stages.common import StageContext, StageResult


def run_stage(ctx: StageContext) -> StageResult:
    """Run one stage in this process (one rank of it, when launched by torchrun or Ray)."""
    from align.stages import dpo, grpo, rm, sft

    runs = {"sft": sft.run, "rm": rm.run, "dpo": dpo.run, "grpo": grpo.run, "rloo": grpo.run}
    return runs[ctx.stage.type](ctx)


@dataclass
class StagePlan:
    """Where a stage starts: the policy it continues and the artifacts it records as parents."""

    start_policy: PublishedArtifact | None
    parents: list[str]


def plan_next(plan: StagePlan, stage_type: str, published: PublishedArtifact) -> StagePlan:
    if stage_type in POLICY_STAGE_TYPES:
        return StagePlan(published, [published.artifact_id])
    return plan


def run_job(
    job: JobSpec,
    *,
    work_root: Path,
    artifact_root: str,
    on_metrics: Callable[[str, dict], None] | None = None,
    on_stage_end: Callable[[str, StageResult], None] | None = None,
    resume: bool = True,
) -> list[StageResult]:
    from align.preflight import check_job

    check_job(job)
    store = ArtifactStore(artifact_root)
    plan = StagePlan(None, [])
    results = []
    for index, name in enumerate(job.stage_names()):
        start_dir = store.download(plan.start_policy.uri) if plan.start_policy else None
        ctx = StageContext(
            job=job,
            index=index,
            work_dir=Path(work_root) / name,
            artifact_root=artifact_root,
            start_policy=start_dir,
            parents=plan.parents,
            threads=job.resources.cpus_per_worker,
            resume=resume,
            on_metrics=(lambda record, name=name: on_metrics(name, record)) if on_metrics else None,
        )
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
        threads=data["threads"],
        resume=data["resume"],
        require_checkpoint=data["require_checkpoint"],
        job_id=data["job_id"],
    )


def run_stage_with_torchrun(ctx: StageContext, nproc: int) -> StageResult:
    """Run one stage as ``nproc`` local ranks; rank 0 writes the published artifact's location."""
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
    subprocess.run(command, env=env, check=True)
    data = json.loads(result_file.read_text())
    published = ArtifactStore(ctx.artifact_root).get(data["uri"])
    return StageResult(published, data["metrics"])
