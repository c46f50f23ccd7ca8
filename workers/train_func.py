"""One Ray Train worker of a stage attempt: ``train_func(config)`` runs the stage as one rank.

Ray Train has already set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and
MASTER_PORT and created the process group; align's ``init_distributed`` wraps that group for
DeepSpeed. Rank 0 alone talks to the service: metrics, heartbeats, checkpoints, sampled completions
and the artifact, with heartbeats from a thread of its own that say whether it trains, evaluates or
publishes (:class:`workers.liveness.Liveness`).
"""

from __future__ import annotations

import json
import os
import socket

import ray
import ray.train

from align.stage_launch import StageLaunch


def train_func(config: dict) -> None:
    """``config``: {"launch": the attempt's StageLaunch as JSON, "total_steps": the steps it plans}."""
    launch = StageLaunch.model_validate_json(config["launch"])
    # Before torch spreads its thread pools over every core of the node.
    os.environ["OMP_NUM_THREADS"] = str(launch.threads)
    import torch

    torch.set_num_threads(launch.threads)

    from align.artifacts import ArtifactStore
    from align.runner import run_stage, stage_context
    from workers.liveness import Liveness
    from workers.report import Reporter

    world_rank = ray.train.get_context().get_world_rank()
    placement = _gather_placement()
    reporter = liveness = None
    if world_rank == 0:
        reporter = Reporter(launch.report.url, launch.report.token, launch.stage_run_id, launch.attempt)
        liveness = Liveness(launch, "training").start()  # heartbeats while it evaluates and publishes too
    try:
        if reporter is None:
            ctx = stage_context(launch)
        else:
            reporter.message("ranks placed: " + json.dumps(placement))
            total_steps = config["total_steps"]

            def on_metrics(record: dict) -> None:
                reporter.metrics(record)
                step = int(record.get("step", 0))
                reporter.heartbeat(step, total_steps, force=step >= total_steps)

            ctx = stage_context(launch, on_metrics=on_metrics, on_samples=reporter.samples,
                                on_checkpoint=reporter.checkpoint, on_message=reporter.message,
                                on_phase=liveness.set_phase)
        result = run_stage(ctx)
        if reporter is not None:
            reporter.artifact(ArtifactStore(launch.artifact_root), result.artifact)
    finally:
        if liveness is not None:
            liveness.stop()
        if reporter is not None:
            reporter.close()  # on an error too: held reports are logged and the HTTP client closed


def _gather_placement() -> list[dict]:
    """Where every rank runs (rank, node id, the cluster's GCS address, host), gathered over the process group
    Ray Train made."""
    import torch.distributed as dist

    context = ray.train.get_context()
    mine = {
        "rank": context.get_world_rank(),
        "local_rank": context.get_local_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "cluster": ray.get_runtime_context().gcs_address,
        "host": socket.gethostname(),
    }
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone
