"""The parts of a stage loop every stage shares: where it resumes, and what follows each optimizer step
(log, evaluate, checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from align.data.stage_data import StageData
from align.engine.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from align.engine.dist import Rank
from align.engine.metrics import MetricsLog, Throughput, grad_norm
from align.stages.context import StageContext, StageModels


class MissingCheckpoint(RuntimeError):
    """A retried attempt found no checkpoint to resume from."""


def resume(ctx: StageContext, engine, rank: Rank, metrics: MetricsLog, others: dict | None = None) -> dict:
    """Restore the newest complete checkpoint (of ``engine`` and the ``others`` saved beside it) and drop
    the metrics logged after it; returns the state saved with it (``step``: the optimizer steps already
    done, and what the stage added), ``{"step": 0}`` when starting afresh."""
    found = complete_checkpoints(ctx.checkpoint_dir) if ctx.resume else []
    if not found:
        if ctx.require_checkpoint:
            raise MissingCheckpoint(
                f"expected a checkpoint under {ctx.checkpoint_dir} to resume from, found none"
            )
        return {"step": 0}
    state = load_checkpoint(engine, found[-1][1], rank, others)
    metrics.truncate_after(state["step"])
    return state


def to_device(batch, device: torch.device):
    """The batch's tensors on ``device``, other values as they are: a dict of them, or a batch that moves
    itself (``align.ops.packing.PackedBatch``)."""
    if not isinstance(batch, dict):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


Evaluate = Callable[[StageContext, Rank, StageModels, StageData], dict]


def after_step(
    ctx: StageContext,
    rank: Rank,
    done: int,
    steps: int,
    *,
    models: StageModels,
    data: StageData,
    evaluate: Evaluate,
    metrics: MetricsLog,
    scheduler,
    throughput: Throughput,
    record: Callable[[], dict],
    samples: list[dict] | None = None,
    checkpoint_state: dict | None = None,
    checkpoint_others: dict | None = None,
) -> None:
    """What follows optimizer step ``done`` of ``steps``, on every rank, each part when it is due:

    1. log, every ``log_every`` steps and after the last: the stage's ``record()`` (its step means;
       every rank calls it, as its sums are reduced over ranks) with ``step``, ``lr``, ``grad_norm`` of
       ``models.engine`` and the throughput; the main rank also writes ``samples`` to samples.jsonl;
    2. evaluate, every ``eval_every`` steps and after the last: ``evaluate(ctx, rank, models, data)``,
       logged when it reports anything;
    3. checkpoint, every ``checkpoint_every`` steps before the last: ``models.engine`` with the
       ``checkpoint_others`` engines, and ``checkpoint_state`` in the saved state beside ``step``.
    """
    stage = ctx.stage
    if done % stage.log_every == 0 or done == steps:
        logged = record()
        logged.update(step=done, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm(models.engine), **throughput.read())
        metrics.log(logged)
        if samples and rank.is_main:
            log_samples(ctx, done, samples)
    if (stage.eval_every and done % stage.eval_every == 0) or done == steps:
        ctx.phase("evaluating")
        held_out = evaluate(ctx, rank, models, data)
        ctx.phase("training")
        if held_out:
            metrics.log({"step": done, **held_out})
    if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < steps:
        state = {"stage": ctx.name, **(checkpoint_state or {})}
        save_checkpoint(models.engine, ctx.checkpoint_dir, done, rank, state, others=checkpoint_others)
        checkpoint_saved(ctx, done)


def checkpoint_saved(ctx: StageContext, step: int) -> None:
    """Tell ``ctx.on_checkpoint``, if set, that the checkpoint after ``step`` is complete."""
    if ctx.on_checkpoint is not None:
        ctx.on_checkpoint(step, str(dict(complete_checkpoints(ctx.checkpoint_dir))[step]))


def log_samples(ctx: StageContext, step: int, samples: list[dict]) -> None:
    """Append sampled completions (prompt, completion, score) after ``step`` to ``samples.jsonl``
    and pass each to ``ctx.on_samples``; call on the main rank."""
    records = [{"step": step, **sample} for sample in samples]
    with (ctx.work_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    if ctx.on_samples is not None:
        ctx.on_samples(records)
