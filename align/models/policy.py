"""The models a stage trains: the policy, or a reward model over the policy or the base."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from align.models.adapters import apply_adapter
from align.models.load import load_causal_lm, load_reward_model, load_tokenizer, resolve_base_model
from align.models.reward import merge_policy_adapter
from align.spec import JobSpec

Progress = Callable[[str], None] | None


def load_policy(job: JobSpec, start_policy: Path | None, dtype: torch.dtype, progress: Progress = None,
                artifact_root: str | None = None):
    """Tokenizer and trainable policy: the base model, continued from ``start_policy`` (an earlier stage's
    artifact folder) when given. ``progress`` hears how the built-in model's build goes; ``artifact_root``
    is the store a ``base_model: artifact:<id>`` is read from."""
    base = resolve_base_model(job.base_model, progress=progress, artifact_root=artifact_root)
    tokenizer = load_tokenizer(base)
    full_start = not job.adapter.is_peft and start_policy is not None
    model = load_causal_lm(start_policy if full_start else base, dtype, job.quantization)
    model = apply_adapter(
        model,
        job.adapter,
        task_type="CAUSAL_LM",
        quantized=job.quantization is not None,
        init_from=start_policy if job.adapter.is_peft else None,
        gradient_checkpointing=job.deepspeed.gradient_checkpointing,
    )
    return tokenizer, model


def load_reward_model_for(job: JobSpec, start_policy: Path | None, dtype: torch.dtype, progress: Progress = None,
                          artifact_root: str | None = None):
    """Tokenizer and trainable reward model: a scalar head on ``start_policy`` when given (``init:
    policy``), else on the base."""
    base = resolve_base_model(job.base_model, progress=progress, artifact_root=artifact_root)
    tokenizer = load_tokenizer(base)
    full_start = start_policy is not None and not job.adapter.is_peft
    model = load_reward_model(start_policy if full_start else base, dtype, tokenizer.pad_token_id, job.quantization)
    if start_policy is not None and not full_start:
        # The policy's adapter becomes part of the reward model's frozen body.
        model = merge_policy_adapter(model, start_policy)
    model = apply_adapter(
        model,
        job.adapter,
        task_type="SEQ_CLS",
        quantized=job.quantization is not None,
        gradient_checkpointing=job.deepspeed.gradient_checkpointing,
    )
    return tokenizer, model


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0, so that the policy and its frozen reference agree exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
