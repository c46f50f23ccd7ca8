"""Learning-rate schedules: linear warm-up, then cosine, linear or constant, as transformers computes them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import get_scheduler

SCHEDULE_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""The spec's ``lr_scheduler`` -> the name of the same schedule in ``transformers.get_scheduler``."""


def schedule_curve(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, **options: float
) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step of ``transformers.get_scheduler(name, ...)``.

    transformers builds a ``LambdaLR`` on ``optimizer``; only its factor function is kept, so the caller
    can read it at shifted steps. ``initial_lr`` it records in the optimizer's groups is the peak rate.
    """
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
        scheduler_specific_kwargs=options or None,
    )
    return scheduler.lr_lambdas[0]


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``W = round(warmup_ratio * total_steps)`` steps, then ``kind`` to the end.

    Optimizer step ``s`` (0-based) gets the peak rate times (s + 1) / (W + 1) during warm-up, so the first
    step already moves; after it, with p = (s - W) / (total - W), 0.5 (1 + cos(pi p)) for cosine, 1 - p for
    linear, 1 for constant. transformers' warm-up is s / W, which spends step 0 at rate 0: this is its
    schedule with one more warm-up step and one more step in all, read one step ahead. Steps past the
    plan (a stage that takes more steps than it planned) hold the rate of step ``total_steps``, where p = 1:
    transformers' cosine would rise again.
    """
    if kind not in SCHEDULE_NAMES:
        raise ValueError(f"lr_scheduler: unknown schedule '{kind}'; use {', '.join(SCHEDULE_NAMES)}")
    warmup_steps = round(warmup_ratio * total_steps)
    curve = schedule_curve(optimizer, SCHEDULE_NAMES[kind], warmup_steps + 1, total_steps + 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: curve(min(step, total_steps) + 1))
