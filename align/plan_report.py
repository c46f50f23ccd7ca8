"""What ``align plan`` does around :func:`align.plan.plan_job`: find the base model's config (its
``config.json`` only, never its weights), describe the device, and print the plans as a table or JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.table import Table

from align.plan import FROZEN_FLOPS_PER_PARAMETER, GPUS, TRAIN_FLOPS_PER_PARAMETER, Device, StagePlan, cpu_device
from align.plan_memory import ACTIVATION_COEFFICIENT, GiB, ModelShape, PlanError
from align.spec import JobSpec

DEVICE_CHOICES = ("h200", "h100", "a100", "cpu")


def load_model_config(base_model: str, model_config: Path | None = None) -> Any:
    """The base model's transformers config: from ``model_config`` (a ``config.json`` or a folder holding
    one) when given, else from ``base_model``: the built-in tiny model's, or a local folder's
    ``config.json``. ``artifact:<id>`` needs ``model_config``."""
    if model_config is not None:
        return _read_config(Path(model_config).expanduser())
    if base_model == "builtin:tiny":
        from transformers import LlamaConfig

        from align.tiny import MODEL_CONFIG, VOCAB_SIZE

        return LlamaConfig(vocab_size=VOCAB_SIZE, **MODEL_CONFIG)
    if base_model.startswith("artifact:"):
        raise PlanError(f"base_model: '{base_model}' is an artifact; give its base model's config with "
                        "--model-config PATH (a config.json or a model folder)")
    return _read_config(Path(base_model.removeprefix("file://")).expanduser())


def _read_config(path: Path) -> Any:
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise PlanError(f"model config: no {file}; give a config.json or a model folder with --model-config") from None
    except (OSError, ValueError) as error:
        raise PlanError(f"model config: cannot read {file}: {error}") from None
    if not isinstance(data, dict):
        raise PlanError(f"model config: {file} does not hold a JSON object")
    if "model_type" not in data and "hidden_size" not in data:
        raise PlanError(f"model config: {file} names neither model_type nor hidden_size, so the model's shape is "
                        "unknown; give the config.json the model was saved with")
    from transformers import AutoConfig, PretrainedConfig

    # The model type's own class fills what config.json leaves out with that model's defaults
    # (tie_word_embeddings above all); an unknown type keeps what the file says.
    fields = {key: value for key, value in data.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(data.get("model_type", "llama"), **fields)
    except (ValueError, KeyError):
        return PretrainedConfig(**fields)


def device_for(job: JobSpec, gpu: str | None) -> Device:
    """The device to plan ``job`` for: ``gpu`` from :data:`DEVICE_CHOICES`, else an H100 when any stage asks
    for GPUs and this machine's CPU when none does (its RAM, and whether it computes bf16 natively)."""
    asks_for_gpus = any(job.stage_resources(i).gpus_per_worker > 0 for i in range(len(job.stages)))
    key = gpu or ("h100" if asks_for_gpus else "cpu")
    if key in GPUS:
        return GPUS[key]
    if key != "cpu":
        raise PlanError(f"--gpu: '{key}' is not known; use one of {', '.join(DEVICE_CHOICES)}")
    from align.precision import cpu_bf16

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return cpu_device(float(memory), native_bf16=cpu_bf16()[0])


def show_bytes(value: float | None) -> str:
    if value is None:
        return "?"
    if value == 0:
        return "-"
    if value >= GiB:
        return f"{value / GiB:.2f} GiB"
    return f"{value / 2**20:.1f} MiB"


def show_seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 100:
        return f"{value:.2f} s"
    if value < 3600:
        return f"{value:.0f} s"
    return f"{value / 3600:.1f} h"


def assumptions(device: Device, plans: list[StagePlan]) -> list[str]:
    """The lines that say what the figures assume."""
    cores = "per core, times cpus_per_worker" if device.kind == "cpu" else "per GPU"
    memory = "unknown" if device.memory is None else show_bytes(device.memory)
    lines = [
        f"device: {device.name}, {memory}; peak bf16 {device.bf16_flops / 1e12:g} TFLOP/s, fp32 "
        f"{device.fp32_flops / 1e12:g} TFLOP/s, {device.bandwidth / 1e9:g} GB/s ({cores})",
        f"time: {TRAIN_FLOPS_PER_PARAMETER} flops per parameter and token trained ({TRAIN_FLOPS_PER_PARAMETER + 2} "
        f"with gradient checkpointing), {FROZEN_FLOPS_PER_PARAMETER} for frozen passes, at an assumed "
        f"{device.utilisation:.0%} of the peak; sampling reads the weights and KV cache once per new token at "
        f"the memory bandwidth; a layer's forward takes at least {device.layer_seconds * 1000:g} ms (a backward "
        "twice that); "
        "attention flops, communication between ranks and held-out evaluation are left out",
        "lengths: worst case, every sequence max_length tokens (online stages: prompts of max_length - "
        "max_new_tokens, completions of max_new_tokens)",
        f"activations: {ACTIVATION_COEFFICIENT} x hidden bytes per token and layer in 16-bit (Korthikanti et al. "
        "2022), twice that in fp32; fused attention (sdpa) keeps no score matrix",
        f"total per rank: weights, gradients, optimizer, ZeRO buckets and {show_bytes(device.runtime_bytes)} "
        "of runtime, plus the largest of activations with logits, the KV cache, and the optimizer step's "
        "float32 gradient copy",
    ]
    if any(plan.fits is None for plan in plans):
        lines.append("fits: unknown without the device's memory")
    return lines


def table(plans: list[StagePlan]) -> Table:
    """One row per stage; memory per rank as G (GiB) or M (MiB)."""

    def cell(value: float | None) -> str:
        if value is None:
            return "?"
        if value == 0:
            return "-"
        return f"{value / GiB:,.2f}G" if value >= GiB else f"{value / 2**20:.1f}M"

    headings = ("stage", "dtype", "weights", "grads+opt", "activations", "logits", "KV cache", "total",
                "available", "fits", "step", "tokens/step")
    rows = [
        (plan.name if plan.name == plan.type else f"{plan.name} ({plan.type})", plan.precision, cell(plan.weights),
         cell(plan.model_states), cell(plan.activations), cell(plan.logits), cell(plan.kv_cache), cell(plan.total),
         cell(plan.budget), "?" if plan.fits is None else ("yes" if plan.fits else "NO"),
         show_seconds(plan.step_seconds), f"{plan.tokens:,}")
        for plan in plans
    ]
    grid = Table(show_edge=False, pad_edge=False, title="per rank; G = GiB, M = MiB", title_justify="left")
    for i, heading in enumerate(headings):
        # Values keep their width on a narrow terminal; the headings wrap instead.
        grid.add_column(heading, justify="left" if heading in ("stage", "dtype", "fits") else "right",
                        min_width=max(len(row[i]) for row in rows))
    for row in rows:
        grid.add_row(*row)
    return grid


def model_line(config: Any) -> str:
    shape = ModelShape.from_config(config)
    tied = ", tied embeddings" if shape.tied_embeddings else ""
    return (f"model: {shape.model_type}, {shape.parameters():,} parameters; {shape.num_layers} layers, hidden "
            f"{shape.hidden_size}, {shape.num_heads} heads ({shape.num_kv_heads} key/value), MLP "
            f"{shape.intermediate_size}, vocabulary {shape.vocab_size:,}{tied}")


def as_json(job: JobSpec, config: Any, device: Device, plans: list[StagePlan]) -> str:
    shape = ModelShape.from_config(config)
    return json.dumps({
        "job": job.name,
        "model": {"parameters": shape.parameters(), **{k: getattr(shape, k) for k in (
            "model_type", "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
            "intermediate_size", "vocab_size", "tied_embeddings")}},
        "device": {"key": device.key, "name": device.name, "memory": device.memory, "bf16_flops": device.bf16_flops,
                   "fp32_flops": device.fp32_flops, "bandwidth": device.bandwidth,
                   "utilisation": device.utilisation},
        "assumptions": assumptions(device, plans),
        "stages": [plan.to_dict() for plan in plans],
    }, indent=2)
