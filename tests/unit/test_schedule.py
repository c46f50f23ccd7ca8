"""Learning-rate schedules from transformers give the rates of the formulas align used before, step for step."""

import math

import pytest
import torch

from align import tiny
from align.engine.schedule import make_scheduler


def former_stage_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """The stage schedule as align wrote it by hand before using transformers'."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def former_tiny_factor(step: int) -> float:
    """The built-in model's pretraining schedule as align wrote it by hand before using transformers'."""
    warmup, steps = tiny.PRETRAIN["warmup_steps"], tiny.PRETRAIN["steps"]
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rates(scheduler, optimizer, steps: int) -> list[float]:
    """The learning rate each optimizer step uses, stepping the scheduler as the training loops do."""
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def optimizer_at(lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize(("total_steps", "warmup_ratio"), [(1, 0.0), (7, 0.0), (10, 0.3), (57, 0.1), (200, 0.05)])
def test_stage_schedule_matches_the_former_formula(kind, total_steps, warmup_ratio):
    """Cosine and constant are bit-identical. Linear is equal to rounding: the former 1 - (s - W)/(T - W)
    loses low bits near the end, transformers' (T - s)/(T - W) is the correctly rounded value."""
    optimizer = optimizer_at(3e-4)
    scheduler = make_scheduler(optimizer, total_steps, warmup_ratio, kind)
    warmup = round(warmup_ratio * total_steps)
    expected = [3e-4 * former_stage_factor(s, total_steps, warmup, kind) for s in range(total_steps)]
    actual = learning_rates(scheduler, optimizer, total_steps)
    if kind == "linear":
        assert actual == pytest.approx(expected, rel=1e-13, abs=1e-19)
    else:
        assert actual == expected
    assert actual[0] > 0  # the first step already moves


def test_stage_schedule_hand_worked():
    """T=10, W=round(0.2*10)=2: warm-up 1/3, 2/3; then cosine over 8 steps: step 6 is p=4/8, factor 0.5."""
    optimizer = optimizer_at(1.0)
    rates = learning_rates(make_scheduler(optimizer, 10, 0.2, "cosine"), optimizer, 10)
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert rates[6] == pytest.approx(0.5)
    assert rates[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_steps_past_the_plan_hold_the_final_rate(kind):
    """The former formula clamped p to 1; transformers' cosine alone would climb back towards the peak."""
    optimizer = optimizer_at(1.0)
    rates = learning_rates(make_scheduler(optimizer, 10, 0.2, kind), optimizer, 25)
    final = former_stage_factor(10, 10, 2, kind)
    assert final == {"cosine": 0.0, "linear": 0.0, "constant": 1.0}[kind]
    assert rates[10:] == pytest.approx([final] * 15, abs=1e-15)
    assert rates[:10] == pytest.approx([former_stage_factor(s, 10, 2, kind) for s in range(10)])


def test_unknown_schedule_names_the_field():
    with pytest.raises(ValueError, match="lr_scheduler: unknown schedule 'step'; use cosine, linear, constant"):
        make_scheduler(optimizer_at(1e-3), 10, 0.0, "step")


def test_tiny_pretraining_schedule_is_bit_identical_to_the_former_formula():
    """The built-in model's weights depend on it: any difference would need a new BUILD_VERSION."""
    optimizer = optimizer_at(tiny.PRETRAIN["learning_rate"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tiny.pretraining_schedule(optimizer))
    steps = tiny.PRETRAIN["steps"]
    expected = [tiny.PRETRAIN["learning_rate"] * former_tiny_factor(s) for s in range(steps)]
    assert learning_rates(scheduler, optimizer, steps) == expected
