"""The models a stage trains: the policy, or a reward model over the policy or the base."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from align.models.adapters import apply_adapter
from align.models.load import load_causal_lm, load_reward_model, load_tokenizer, resolve_base_model
from align.models.reward import merge_policy_adapter

if TYPE_CHECKING:
    from align.stages.context import StageContext


def load_policy(ctx: StageContext):
    """Tokenizer and trainable policy: the base model, continued from ``start_policy`` when given."""
    job = ctx.job
    base = resolve_base_model(job.base_model, progress=ctx.message)
    tokenizer = load_tokenizer(base)
    full_start = job.adapter.type == "full" and ctx.start_policy is not None
    model = load_causal_lm(ctx.start_policy if full_start else base, ctx.dtype, job.quantization)
    model = apply_adapter(
        model,
        job.adapter,
        task_type="CAUSAL_LM",
        quantized=job.quantization is not None,
        init_from=ctx.start_policy if job.adapter.type != "full" else None,
        gradient_checkpointing=job.deepspeed.gradient_checkpointing,
    )
    return tokenizer, model


def load_reward_model_for(ctx: StageContext):
    """Tokenizer and trainable reward model: a scalar head on the starting policy (``init: policy``) or
    on the base."""
    job = ctx.job
    base = resolve_base_model(job.base_model, progress=ctx.message)
    tokenizer = load_tokenizer(base)
    from_policy = ctx.stage.init == "policy" and ctx.start_policy is not None
    full_start = from_policy and job.adapter.type == "full"
    model = load_reward_model(
        ctx.start_policy if full_start else base, ctx.dtype, tokenizer.pad_token_id, job.quantization
    )
    if from_policy and not full_start:
        # The policy's adapter becomes part of the reward model's frozen body.
        model = merge_policy_adapter(model, ctx.start_policy)
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
