"""Attention over packed rows (``align.ops.packing``), registered with transformers as ``align_packed``.

A model switched to ``align_packed`` attends as it did with ``sdpa`` until a forward passes
``packed_blocks``: then each :class:`~align.ops.packing.Block` runs its own scaled-dot-product
attention over its key spans, so no ``(total, total)`` mask is built and no query sees another
sequence. The forward also passes a placeholder 4D ``attention_mask``, which transformers hands on
as it is instead of building a causal mask over the packed row.

:func:`packed_token_logprobs` runs such a forward and projects only the scored positions to the
vocabulary (``logits_to_keep``), so the logits are ``(scored, vocab)``, never ``(batch, seq, vocab)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from align.ops.logprobs import token_logprobs
from align.ops.packing import Block, PackedBatch

IMPLEMENTATION = "align_packed"


def packed_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_blocks: tuple[Block, ...] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``query`` (1, heads, total, dim), ``key``/``value`` (1, kv_heads, total, dim) → (1, total, heads, dim).

    Without ``packed_blocks`` this is transformers' ``sdpa`` attention."""
    if packed_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = []
    for block in packed_blocks:
        queries = query[:, :, block.q_start : block.q_end]
        if block.self_only:
            keys, values = key[:, :, block.q_start : block.q_end], value[:, :, block.q_start : block.q_end]
            mask, causal = None, True
        else:
            keys = torch.cat([key[:, :, start:end] for start, end in block.kv], dim=2)
            values = torch.cat([value[:, :, start:end] for start, end in block.kv], dim=2)
            mask, causal = _bottom_right_causal(queries.shape[2], keys.shape[2], query.device), False
        outputs.append(F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling,
        ))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _bottom_right_causal(queries: int, keys: int, device: torch.device) -> Tensor:
    """(queries, keys) boolean mask: query i sees keys ``0 .. keys - queries + i``."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)


AttentionInterface.register(IMPLEMENTATION, packed_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_packed_attention(model: torch.nn.Module) -> bool:
    """Switch ``model`` (a transformers model, or a peft model around one) from ``sdpa`` to ``align_packed``;
    True when it now takes packed rows. Models on another attention implementation (eager, flash
    attention) or that cannot switch are left as they are, and False tells the stage to pad."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
        return False
    if config._attn_implementation == "sdpa" and hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(IMPLEMENTATION)
    return config._attn_implementation == IMPLEMENTATION


def packed_token_logprobs(model, packed: PackedBatch) -> Tensor:
    """(scored,) log-probabilities of ``packed.score_labels`` under ``model`` on the packed row, float32.

    ``model`` is anything called like a transformers causal LM (a DeepSpeed engine, a peft model);
    it must have been switched with :func:`use_packed_attention`."""
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=packed.input_ids.device)
    logits = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=placeholder,
        packed_blocks=packed.blocks,
        logits_to_keep=packed.score_positions,
        use_cache=False,
    ).logits
    return token_logprobs(logits, packed.score_labels[None])[0]
