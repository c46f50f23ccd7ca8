"""Adapters on the base model (LoRA, DoRA, QLoRA), saving them, and LoRA+ parameter groups."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

from align.spec import AdapterSpec


def apply_adapter(
    model: torch.nn.Module,
    spec: AdapterSpec,
    *,
    task_type: str,
    quantized: bool,
    init_from: Path | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Make ``model`` trainable as ``spec`` asks.

    ``init_from`` is an earlier stage's adapter folder: training continues from those weights. With
    ``full`` fine-tuning the earlier stage's weights are the model itself, so nothing is added.
    """
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.type == "full":
        model.requires_grad_(True)
        return model
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if init_from is not None:
        return PeftModel.from_pretrained(model, init_from, is_trainable=True)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.type == "dora",
        task_type=task_type,
    )
    if gradient_checkpointing or quantized:
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float | None):
    """Optimizer groups. With LoRA+ (Hayou et al. 2024) the B matrices get ``lr * lora_plus_ratio``."""
    regular, lora_b = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (lora_b if lora_plus_ratio and "lora_B" in name else regular).append(param)
    groups = [{"params": regular, "lr": lr, "weight_decay": weight_decay}]
    if lora_b:
        groups.append({"params": lora_b, "lr": lr * lora_plus_ratio, "weight_decay": weight_decay})
    return groups


def trainable_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, gathered from every rank under ZeRO-3."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gather = nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        return {name: param.detach().to("cpu", copy=True) for name, param in named}


def save_trainable(
    model: torch.nn.Module, out_dir: Path, zero_stage: int, write: bool, base_model: str | None = None
) -> None:
    """Save what the stage trained: the peft adapter, or the whole model after full fine-tuning.

    Every rank must call this (ZeRO-3 gathers collectively); only ranks with ``write`` write files.
    ``base_model`` is how ``adapter_config.json`` names the base (``base_model_name_or_path``), e.g.
    ``builtin:tiny``, in place of the local folder peft records: the folder the base was loaded from,
    which for ``builtin:tiny`` is a cache folder. It is written after peft saved, since peft reads the
    base's config.json from that folder while saving.
    """
    if isinstance(model, PeftModel):
        state = trainable_state_dict(model, zero_stage)
        if write:
            model.save_pretrained(out_dir, state_dict=state, selected_adapters=["default"])
            if base_model is not None:
                config_file = Path(out_dir) / "adapter_config.json"
                config = json.loads(config_file.read_text())
                config["base_model_name_or_path"] = base_model
                config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        return
    named = list(model.named_parameters())
    gather = nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        if write:
            state = {n: p.detach().to("cpu", copy=True) for n, p in model.state_dict().items()}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
