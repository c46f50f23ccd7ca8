"""Run a job's stages in order on this machine, without the service.

Each stage starts from what :func:`align.lineage.stage_inputs` says: the policy the last policy stage
(sft, dpo, orpo, simpo, kto, ppo, grpo, rloo) published, and for online stages that score with a reward model, the one
their spec names or the latest one the job trained. A stage with one worker runs in this process; with
several it runs under torchrun, one process per rank, each with its share of the CPU threads.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from align.artifacts import ARTIFACT_REF_PREFIX, ArtifactError, ArtifactStore, PublishedArtifact
from align.engine.dist import free_port
from align.gates import GateFailed
from align.lineage import InputArtifact, MissingInput, stage_inputs, start_artifact_check
from align.spec import JobSpec
from align.stage_launch import StageLaunch
from align.stages.context import StageContext, StageResult
from align.tracking import MLFLOW_TRACKING_URI_ENV


def run_stage(ctx: StageContext) -> StageResult:
    """Run one stage in this process (one rank of it, when launched by torchrun or Ray)."""
    from align.stages import dpo, grpo, kto, ppo, reference_free, rm, sft

    runs = {"sft": sft.run, "rm": rm.run, "dpo": dpo.run, "orpo": reference_free.run, "simpo": reference_free.run,
            "kto": kto.run, "ppo": ppo.run, "grpo": grpo.run, "rloo": grpo.run}
    try:
        return runs[ctx.stage.type](ctx)
    except BaseException:
        if ctx.tracker is not None:  # the MLflow run of a failed attempt reads FAILED (a retry may resume it)
            ctx.tracker.end(failed=True)
        raise


def stage_context(
    launch: StageLaunch,
    *,
    on_metrics: Callable[[dict], None] | None = None,
    on_samples: Callable[[list[dict]], None] | None = None,
    on_checkpoint: Callable[[int, str], None] | None = None,
    on_message: Callable[[str, str], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> StageContext:
    """The context this process runs ``launch`` in; the callbacks are the stage's (see StageContext).

    The start policy and the reward model are fetched from the artifact store, checked file by file: each
    process fetches its own (a remote store's copy lands in this machine's cache), never from another
    node's disk.
    """
    store = ArtifactStore(launch.artifact_root)
    return StageContext(
        job=launch.spec,
        index=launch.index,
        work_dir=launch.work_dir,
        artifact_root=launch.artifact_root,
        start_policy=store.download(launch.start_policy) if launch.start_policy else None,
        parents=list(launch.parents),
        reward_model=store.download(launch.reward_model) if launch.reward_model else None,
        threads=launch.threads,
        resume=launch.resume,
        require_checkpoint=launch.require_checkpoint,
        on_metrics=on_metrics,
        on_samples=on_samples,
        on_checkpoint=on_checkpoint,
        on_message=on_message,
        on_phase=on_phase,
        job_id=launch.job_id,
        stage_run_id=launch.stage_run_id,
        attempt=launch.attempt,
        mlflow_tracking_uri=launch.mlflow_tracking_uri,
    )


def input_artifact(artifact: PublishedArtifact) -> InputArtifact:
    """A published artifact as :func:`align.lineage.stage_inputs` sees it."""
    manifest = artifact.manifest
    return InputArtifact(artifact.artifact_id, artifact.uri, manifest.kind, manifest.base_model)


def store_finder(artifact_root: str) -> Callable[[str], InputArtifact | None]:
    """Looks up an artifact id in the store at ``artifact_root``: None when it holds no such artifact."""
    store = ArtifactStore(artifact_root)

    def find(artifact_id: str) -> InputArtifact | None:
        try:
            return input_artifact(store.get(ARTIFACT_REF_PREFIX + artifact_id))
        except ArtifactError:
            return None

    return find


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
    too) and ``on_stage_end(stage, result)``.

    A named ``reward_model: artifact:<id>`` and a ``base_model: artifact:<id>`` are looked up in
    ``artifact_root``; a missing or unfit one raises :class:`align.lineage.MissingInput` before any stage.
    A stage whose ``gate`` fails has published its artifact; :class:`align.gates.GateFailed` then stops the
    job with the results so far."""
    from align.preflight import check_job, planned_steps

    check_job(job)
    find = store_finder(artifact_root)
    problem = start_artifact_check(job, find)
    if problem is not None:
        raise MissingInput("base_model", problem)
    published: dict[int, InputArtifact] = {}
    results = []
    for index, name in enumerate(job.stage_names()):
        inputs = stage_inputs(job, index, published, find)
        launch = StageLaunch(
            spec=job,
            index=index,
            work_dir=Path(work_root) / name,
            artifact_root=artifact_root,
            start_policy=inputs.start_policy,
            reward_model=inputs.reward_model,
            parents=inputs.parents,
            resume=resume,
            mlflow_tracking_uri=os.environ.get(MLFLOW_TRACKING_URI_ENV) if "mlflow" in job.report_to else None,
        )
        stage_metrics = (lambda record, name=name: on_metrics(name, record)) if on_metrics else None
        stage_message = (lambda text, level, name=name: on_message(name, text, level)) if on_message else None
        if on_stage_start:
            on_stage_start(name, planned_steps(job.stages[index], launch.resources.num_workers))
        if launch.resources.num_workers == 1:
            result = run_stage(stage_context(launch, on_metrics=stage_metrics, on_message=stage_message))
            gc.collect()
        else:
            result = run_stage_with_torchrun(launch, launch.resources.num_workers, stage_metrics, stage_message)
        results.append(result)
        if on_stage_end:
            on_stage_end(name, result)
        gate = result.artifact.manifest.gate
        if gate is not None and not gate["passed"]:
            raise GateFailed(name, gate, results)
        published[index] = input_artifact(result.artifact)
    return results


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


def run_stage_with_torchrun(
    launch: StageLaunch,
    nproc: int,
    on_metrics: Callable[[dict], None] | None = None,
    on_message: Callable[[str, str], None] | None = None,
) -> StageResult:
    """Run one stage as ``nproc`` local ranks (``python -m align.launch``, which reads ``launch.json`` in the
    stage's work folder); rank 0 writes the published artifact's location. Its metrics and messages reach
    ``on_metrics`` / ``on_message``; the rest of the ranks' output goes to ``ranks.log`` in the stage's work
    folder (and to stdout when there are no callbacks)."""
    launch.work_dir.mkdir(parents=True, exist_ok=True)
    launch_file = launch.work_dir / "launch.json"
    launch_file.write_text(launch.model_dump_json())
    result_file = launch.work_dir / "result.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(launch.threads))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "align.launch", str(launch_file), str(result_file),
    ]
    log_path = launch.work_dir / "ranks.log"
    with open(log_path, "w") as log, subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            if not relay_rank_line(line, on_metrics, on_message):
                log.write(line)
                if on_metrics is None and on_message is None:
                    sys.stdout.write(line)
    if process.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"stage {launch.name}: torchrun exited with {process.returncode}; the ranks' output is "
                           f"in {log_path}, ending:\n{tail}")
    data = json.loads(result_file.read_text())
    published = ArtifactStore(launch.artifact_root).get(data["uri"])
    return StageResult(published, data["metrics"])
