"""Which rows each optimizer step trains on, and how many steps a stage takes."""

from __future__ import annotations

import math
from typing import Any

import torch

from align.engine.dist import Rank


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """Optimizer steps that see every row once (the last step wraps around to fill its batch)."""
    return max(1, math.ceil(num_rows / global_batch))


def total_steps(stage: Any, num_rows: int, world_size: int) -> int:
    """The stage's ``max_steps``, else ``epochs`` passes over ``num_rows`` (rounded up, at least 1)."""
    if stage.max_steps is not None:
        return stage.max_steps
    global_batch = stage.batch_size * stage.gradient_accumulation_steps * world_size
    return max(1, math.ceil(stage.epochs * steps_per_epoch(num_rows, global_batch)))


def micro_batch_indices(
    num_rows: int, step: int, batch_size: int, accumulation: int, rank: Rank, seed: int
) -> list[list[int]]:
    """Row indices of this rank's micro-batches for optimizer step ``step``.

    The order is a pure function of (seed, step): each epoch is a fresh permutation, a global batch
    takes the next ``batch_size * accumulation * world_size`` rows of it (wrapping around to the
    epoch's start to fill the last one), and micro-batch m of rank r takes slice (m * world + r).
    Resuming at a step therefore needs no saved sampler state, and 8x1 and 2x4 accumulation see
    the same rows in each step.
    """
    global_batch = batch_size * accumulation * rank.world_size
    epoch, position = divmod(step, steps_per_epoch(num_rows, global_batch))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator).tolist()
    rows = [order[(position * global_batch + j) % num_rows] for j in range(global_batch)]
    slices = []
    for m in range(accumulation):
        begin = (m * rank.world_size + rank.rank) * batch_size
        slices.append(rows[begin : begin + batch_size])
    return slices
