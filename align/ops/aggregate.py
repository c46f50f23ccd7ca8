"""Loss normalisation across gradient-accumulation micro-batches and data-parallel ranks.

A global optimizer step sees ``gradient_accumulation_steps`` micro-batches on each of
``world_size`` ranks. DeepSpeed divides each micro-batch loss by ``gradient_accumulation_steps``
before backward and averages gradients over ranks. The objective we want per step is

    L = (sum of every unit loss in the step, all micro-batches, all ranks) / N

with N the global number of units (tokens for SFT, pairs for DPO and reward models). Averaging
within each micro-batch instead weights a token by 1 / (tokens in its micro-batch), so the same data
gives different gradients under 8x1 and 2x4 accumulation when sequence lengths differ (torchtune
issue #2307). Stages therefore compute a micro-batch's loss *sum* and multiply it by
:func:`accumulation_scale`, with N from :func:`global_count`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def accumulation_scale(global_count: float, gradient_accumulation_steps: int, world_size: int) -> float:
    """Factor turning a micro-batch's summed unit losses into its share of the global-step mean.

    ``scale = gradient_accumulation_steps * world_size / global_count``.

    The engine computes ``grad = (1 / world_size) · sum_ranks sum_micro (1 / gas) · grad(scale · S_micro)``
    with ``S_micro`` the micro-batch loss sum; substituting the scale leaves
    ``grad(sum_ranks sum_micro S_micro) / global_count``, the gradient of the token-weighted
    (or pair-weighted) mean over the whole step, whatever the split into micro-batches and ranks.

    Args:
        global_count: units (tokens or pairs) in the whole global step, summed over all
            micro-batches of the step and all ranks. A step with no units gives scale 0, so its
            (zero) loss sum contributes nothing instead of NaN.
        gradient_accumulation_steps: micro-batches per rank per optimizer step (>= 1).
        world_size: data-parallel ranks (>= 1).
    """
    if gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if global_count < 0:
        raise ValueError(f"global_count must be >= 0, got {global_count}")
    if global_count == 0:
        return 0.0
    return gradient_accumulation_steps * world_size / float(global_count)


def global_count(local_count: Tensor | float, group=None) -> float:
    """Sum of ``local_count`` over the ranks of ``group`` (the default group when None).

    Identity when ``torch.distributed`` is not initialised (single process). Every rank of the
    group must call this the same number of times, as with any collective. The sum travels as
    float64 so token counts stay exact; on an NCCL group it is placed on the current CUDA device.
    """
    value = (
        float(local_count.detach().sum().item()) if isinstance(local_count, Tensor) else float(local_count)
    )
    if not (dist.is_available() and dist.is_initialized()):
        return value
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return float(total.item())
