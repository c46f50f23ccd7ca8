"""Batches and log-probs of sampled completions, for the online stages (PPO, GRPO, RLOO)."""

from __future__ import annotations

import torch

from align.data import collate
from align.ops.logprobs import token_logprobs


def completion_batch(prompts: list[dict], completions: list, pad: int) -> dict:
    """Prompt plus sampled completion (``align.generation.Completion``), right-padded, with
    ``loss_mask`` on the completion tokens (EOS included)."""
    features = []
    for completion in completions:
        prompt_ids = prompts[completion.prompt_index]["prompt_input_ids"]
        features.append({
            "input_ids": list(prompt_ids) + completion.token_ids,
            "loss_mask": [0] * len(prompt_ids) + [1] * len(completion.token_ids),
        })
    return collate.collate_sft(features, pad)


def group_batch(prompts: list[dict], completions: list, group_size: int, pad: int) -> dict:
    """Prompts once (left-padded: ``prompt_ids``, ``prompt_mask``, (prompts, P)) and their completions
    (right-padded: ``completion_ids``, ``completion_mask``, (prompts * group_size, C)), completion ``i``
    continuing prompt ``i // group_size``. The mask is 1 on every completion token, EOS included."""
    prompt_ids = [list(p["prompt_input_ids"]) for p in prompts]
    completion_ids = [c.token_ids for c in completions]
    return {
        "prompt_ids": collate.pad_sequences(prompt_ids, pad, side="left"),
        "prompt_mask": collate.pad_sequences([[1] * len(ids) for ids in prompt_ids], 0, side="left"),
        "completion_ids": collate.pad_sequences(completion_ids, pad),
        "completion_mask": collate.pad_sequences([[1] * len(ids) for ids in completion_ids], 0),
    }


def completion_logps(model, batch: dict, group_size: int, shared_prefix: bool = True) -> torch.Tensor:
    """Log-probs of every completion token of a :func:`group_batch`, (prompts * group_size, C).

    With ``shared_prefix`` each prompt is encoded once: a forward over the prompts fills a KV cache,
    the cache is repeated for the ``group_size`` completions of each prompt, and a forward over the
    completions reads it. This gives the values of a forward over prompt + completion (the prompt's
    keys and values do not depend on the completion) for a fraction of the prompt work, and the
    gradient flows through the shared prompt pass. Without it (gradient checkpointing keeps no
    cache), every completion runs with its own copy of the prompt.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    offsets = torch.arange(1, completion_ids.shape[1] + 1, device=completion_ids.device)
    completion_positions = positions[:, -1:].repeat_interleave(group_size, dim=0) + offsets
    attention = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0), completion_mask], dim=1)
    if not shared_prefix:
        logits = model(
            input_ids=torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), completion_ids], dim=1),
            attention_mask=attention,
            position_ids=torch.cat([positions.repeat_interleave(group_size, dim=0), completion_positions], dim=1),
            logits_to_keep=completion_ids.shape[1] + 1,  # the last prompt position and the completion's
        ).logits[:, :-1]
        return token_logprobs(logits, completion_ids)
    from transformers import DynamicCache

    from align.generation import cache_argument

    cache = DynamicCache()  # filled in place by the prompt pass
    prompt = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_argument(model, cache))
    cache.batch_repeat_interleave(group_size)
    logits = model(input_ids=completion_ids, attention_mask=attention, position_ids=completion_positions,
                   use_cache=True, **cache_argument(model, cache)).logits
    # The first completion token is predicted at the prompt's last position.
    logits = torch.cat([prompt.logits[:, -1:].repeat_interleave(group_size, dim=0), logits[:, :-1]], dim=1)
    return token_logprobs(logits, completion_ids)


def sampling_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A distinct, reproducible sampling stream per (seed, step, rank, micro-batch): resuming at a
    step samples the same completions an uninterrupted run would."""
    return (seed * 1_000_003 + step) * 65_537 + rank * 1_024 + micro
