"""One Ray Train worker of a stage attempt: ``train_func(config)`` runs the stage as one rank.

Ray Train has already set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and
MASTER_PORT and created the process group; align's ``init_distributed`` wraps that group for
DeepSpeed. Rank 0 alone talks to the service: metrics, heartbeats, checkpoints, sampled completions
and the artifact.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import ray
import ray.train


def train_func(config: dict) -> None:
    """``config``: {"ticket": the attempt ticket, "threads": CPU threads for this rank}."""
    threads = max(1, int(config["threads"]))
    # Before torch spreads its thread pools over every core of the node.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)

    from align.artifacts import ArtifactStore
    from align.runner import run_stage
    from align.spec import parse_spec
    from align.stages.common import StageContext
    from workers.report import Reporter

    ticket = config["ticket"]
    world_rank = ray.train.get_context().get_world_rank()
    placement = _gather_placement()
    job = parse_spec(ticket["spec"])
    store = ArtifactStore(ticket["artifact_root"])
    # Each node fetches the starting policy and the reward model from the store, never from local disk.
    start_policy = store.download(ticket["start_policy"]) if ticket.get("start_policy") else None
    reward_model = store.download(ticket["reward_model"]) if ticket.get("reward_model") else None

    reporter = None
    if world_rank == 0:
        reporter = Reporter(ticket["report_url"], ticket["report_token"], ticket["stage_run_id"], ticket["attempt"])
    try:
        if reporter is not None:
            reporter.message("ranks placed: " + json.dumps(placement))
        total_steps = config["total_steps"]

        def on_metrics(record: dict) -> None:
            reporter.metrics(record)
            step = int(record.get("step", 0))
            reporter.heartbeat(step, total_steps, force=step >= total_steps)

        ctx = StageContext(
            job=job,
            index=ticket["index"],
            work_dir=Path(ticket["work_dir"]),
            artifact_root=ticket["artifact_root"],
            start_policy=start_policy,
            parents=list(ticket.get("parents") or []),
            reward_model=reward_model,
            threads=threads,
            resume=True,
            require_checkpoint=bool(ticket.get("require_checkpoint")),
            on_metrics=on_metrics if reporter else None,
            on_samples=reporter.samples if reporter else None,
            on_checkpoint=reporter.checkpoint if reporter else None,
            on_message=reporter.message if reporter else None,
            job_id=ticket.get("job_id"),
        )
        result = run_stage(ctx)
        if reporter is not None:
            reporter.artifact(store, result.artifact)
    finally:
        if reporter is not None:
            reporter.close()  # on an error too: held reports are logged and the HTTP client closed


def _gather_placement() -> list[dict]:
    """Where every rank runs (rank, node id, the cluster's GCS address, host), gathered over the process group Ray Train made."""
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
