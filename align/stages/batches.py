"""Micro-batches of SFT rows and preference pairs, padded or packed, and what a model scores on them.

A stage that trains on fixed rows lays each micro-batch out one of two ways: packed padding-free in one
row (``align.ops.packing``; the default when the model's attention can switch to
``align.models.packed_attention``), or right-padded (``align.data.collate``). The functions here give
the same numbers for either layout, so the stage loop does not branch on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from align.data.collate import collate_preference, collate_sft
from align.losses.sft import sft_loss
from align.models.adapters import is_prompt_learning
from align.models.packed_attention import packed_token_logprobs, use_packed_attention
from align.ops.logprobs import sequence_logprobs, token_logprobs
from align.ops.packing import PackedBatch, pack_preference, pack_sft, scored_counts, sequence_sums

Batch = PackedBatch | dict[str, Tensor]


def packs(stage, model: torch.nn.Module, message=None) -> bool:
    """Whether ``stage`` trains on packed rows: it asks for ``padding_free`` and ``model`` can attend over
    packed rows (switching it to ``align_packed`` attention). ``message`` hears why a stage that asked
    to pack pads instead.

    A prefix- or prompt-tuned model pads: its virtual tokens go in front of each sequence, and a packed row
    holds many sequences in one."""
    if not getattr(stage, "padding_free", False):
        return False
    if is_prompt_learning(model):
        if message is not None:
            kind = "prefix" if model.active_peft_config.peft_type == "PREFIX_TUNING" else "prompt"
            message(f"padding_free: the {kind}-tuning adapter puts its virtual tokens in front of every sequence, "
                    "which packed rows cannot hold; batches are padded")
        return False
    if use_packed_attention(model):
        return True
    if message is not None:
        message("padding_free: this model's attention implementation cannot take packed rows; batches are padded")
    return False


def sft_batch(rows: list[dict[str, Any]], pad_id: int, packed: bool) -> Batch:
    return pack_sft(rows) if packed else collate_sft(rows, pad_id)


def preference_batch(pairs: list[dict[str, Any]], pad_id: int, packed: bool) -> Batch:
    """Chosen sequences first, then rejected, in the order of ``pairs``."""
    return pack_preference(pairs) if packed else collate_preference(pairs, pad_id)


def held_out_pair_batches(pairs: list[dict[str, Any]], rank, batch_size: int, pad_id: int, packed: bool):
    """``(weight, indices, batch)`` for each micro-batch of this rank's share of the held-out ``pairs``
    (on the CPU: the caller moves it).

    Every rank runs the same number of micro-batches, as under ZeRO-3 every forward is collective: a rank
    out of pairs runs pair 0 again with weight 0, so that it counts nothing.
    """
    shard = list(range(rank.rank, len(pairs), rank.world_size))
    for begin in range(0, -(-len(pairs) // (batch_size * rank.world_size)) * batch_size, batch_size):
        indices = shard[begin : begin + batch_size]
        weight = 1.0 if indices else 0.0
        indices = indices or [0]
        yield weight, indices, preference_batch([pairs[i] for i in indices], pad_id, packed)


def input_tokens(batch: Batch) -> int:
    """The tokens of the batch's sequences, padding left out (a shared prompt counted once per sequence)."""
    return batch.tokens if isinstance(batch, PackedBatch) else int(batch["attention_mask"].sum())


def scored_tokens(batch: Batch) -> int:
    """Tokens the loss is taken on."""
    return int(batch.score_labels.numel()) if isinstance(batch, PackedBatch) else int(batch["loss_mask"][:, 1:].sum())


def response_lengths(batch: Batch) -> Tensor:
    """(sequences,) scored tokens of each sequence."""
    return scored_counts(batch) if isinstance(batch, PackedBatch) else batch["loss_mask"][:, 1:].sum(-1)


def scored_nll(model, batch: Batch) -> Tensor:
    """Summed negative log-likelihood of the scored tokens (a differentiable scalar)."""
    if isinstance(batch, PackedBatch):
        token_logps = packed_token_logprobs(model, batch)
        return sft_loss(token_logps, torch.ones_like(token_logps, dtype=torch.bool))[0]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sft_loss(token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:]), batch["loss_mask"][:, 1:])[0]


def sequence_logps(model, batch: Batch) -> Tensor:
    """(sequences,) summed log-probs of each sequence's scored tokens, ``log π(y | x)``."""
    if isinstance(batch, PackedBatch):
        return sequence_sums(packed_token_logprobs(model, batch), batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
