"""Whether a job's stages fit the memory their ranks get, and what would make one that does not fit.

:func:`fit_problems` plans the job (:func:`align.plan.plan_job`) and, for each stage over its budget, plans
the usual remedies one at a time (ZeRO-3, optimizer offload, QLoRA, gradient checkpointing, a LoRA adapter
in place of full fine-tuning, a smaller micro-batch) and names those that fit. ``POST /jobs`` refuses such a
job with these problems; ``align plan`` prints them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from align.plan import Device, StagePlan, plan_job
from align.plan_report import show_bytes
from align.spec import JobSpec, SpecError, parse_spec

Remedy = tuple[str, Callable[[dict, int], None]]


def _remedies(job: JobSpec, index: int) -> Iterator[Remedy]:
    """(what to write in the spec, how it changes the spec's dict) for each remedy that applies."""
    ds, stage = job.deepspeed, job.stages[index]
    if ds.zero_stage != 3 and job.stage_resources(index).num_workers > 1 and job.quantization is None:
        yield "deepspeed.zero_stage: 3", lambda spec, i: spec["deepspeed"].update(zero_stage=3)
    if not ds.offload_optimizer:
        def offload(spec: dict, i: int) -> None:
            spec["deepspeed"].update(offload_optimizer=True, zero_stage=max(spec["deepspeed"]["zero_stage"], 1))
        yield "deepspeed.offload_optimizer: true" + (" (zero_stage 1 or more)" if ds.zero_stage == 0 else ""), offload
    if job.quantization is None and ds.zero_stage != 3 and job.adapter.type != "full":
        yield "quantization: {bits: 4} (QLoRA)", lambda spec, i: spec.update(quantization={"bits": 4})
    if not ds.gradient_checkpointing:
        yield "deepspeed.gradient_checkpointing: true", lambda spec, i: spec["deepspeed"].update(
            gradient_checkpointing=True)
    if job.adapter.type == "full":
        yield "adapter.type: lora", lambda spec, i: spec.update(adapter={"type": "lora"})
    size, accumulation = stage.batch_size, stage.gradient_accumulation_steps
    while size > 1:
        size //= 2
        steps = accumulation * stage.batch_size // size

        def smaller(spec: dict, i: int, size: int = size, steps: int = steps) -> None:
            spec["stages"][i].update(batch_size=size, gradient_accumulation_steps=steps)
        yield (f"stages[{index}].batch_size: {size} with gradient_accumulation_steps: {steps} (the same global "
               "batch)"), smaller


def _variant(job: JobSpec, index: int, change: Callable[[dict, int], None]) -> JobSpec | None:
    spec = job.model_dump(mode="json")
    change(spec, index)
    try:
        return parse_spec(spec)
    except SpecError:
        return None  # a remedy this spec cannot take (e.g. QLoRA beside an online stage's rules)


def fit_problems(job: JobSpec, model_config: Any, device: Device | Callable[[int], Device]) -> list[tuple[str, str]]:
    """``(field, message)`` for every stage that does not fit ``device`` as the spec asks: what it needs
    per rank, how much is missing, and the single changes that would make it fit (of the smaller batches,
    the largest that fits), else a set of them that fits together."""
    problems = []
    for index, plan in enumerate(plan_job(job, model_config, device)):
        if plan.fits is not False:
            continue
        fixes = []
        for text, change in _remedies(job, index):
            variant = _variant(job, index, change)
            if variant is not None and plan_job(variant, model_config, device)[index].fits:
                fixes.append(text)
                if text.startswith(f"stages[{index}].batch_size"):
                    break  # the largest batch that fits; smaller ones fit too
        together = [] if fixes else _combined(job, index, model_config, device)
        stage_device = device(index) if callable(device) else device
        problems.append((f"stages[{index}]", shortfall(plan, stage_device, fixes, together)))
    return problems


def _combined(job: JobSpec, index: int, model_config: Any, device: Device | Callable[[int], Device]
              ) -> list[str] | None:
    """The remedies that fit together, added one at a time in :func:`_remedies`' order (the smaller batches
    last, each replacing the one before); None when even all of them do not fit."""
    applied: list[str] = []
    current = job
    for text, change in _remedies(job, index):
        variant = _variant(current, index, change)
        if variant is None:
            continue
        if text.startswith(f"stages[{index}].batch_size") and applied and "batch_size" in applied[-1]:
            applied.pop()
        current = variant
        applied.append(text)
        if plan_job(current, model_config, device)[index].fits:
            return applied
    return None


def shortfall(plan: StagePlan, device: Device, fixes: list[str], together: list[str] | None = None) -> str:
    """The message of a stage that does not fit: need, shortfall, and what would fit (see :func:`fit_problems`)."""
    where = (f"one rank's share of this machine's {show_bytes(device.memory)} RAM" if device.kind == "cpu"
             else f"one {device.name} per rank")
    text = (f"{plan.name} needs about {show_bytes(plan.total)} per rank (align plan), "
            f"{show_bytes(plan.total - plan.budget)} more than the {show_bytes(plan.budget)} of {where}")
    if fixes:
        return f"{text}; it would fit with any of: {'; '.join(fixes)}"
    if together:
        return f"{text}; no single change fits it, but these together do: {'; '.join(together)}"
    return (f"{text}; even ZeRO-3, optimizer offload, QLoRA, gradient checkpointing and a batch of 1 together "
            "do not fit it: ask for more memory per rank (more GPUs, a larger device) or a smaller max_length")
