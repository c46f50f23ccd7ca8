"""Held-out evaluation shared by the stages: generation-based exact match (sampled replies scored with a
reward: :mod:`align.evaluate_generations`)."""

from __future__ import annotations

import torch

from align.data import collate, tokenize
from align.engine.dist import Rank, all_reduce_sum
from align.generation import CachedGenerator, SamplingParams
from align.models.adapters import is_prompt_learning


def rank_share(items: list, rank: Rank) -> tuple[list, list[bool]]:
    """This rank's share, padded so every rank runs the same number of batches (ZeRO-3 needs it)."""
    per_rank = -(-len(items) // rank.world_size)
    mine = items[rank.rank * per_rank : (rank.rank + 1) * per_rank]
    counted = [True] * len(mine)
    while len(mine) < per_rank:
        mine.append(items[0])
        counted.append(False)
    return mine, counted


@torch.no_grad()
def exact_match(
    model,
    tokenizer,
    rows: list[dict],
    rank: Rank,
    *,
    max_prompt_length: int,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    synced_gpus: bool = False,
) -> float:
    """Fraction of held-out rows whose greedy answer equals the reference answer (both stripped).

    Rows are SFT or preference rows; the reference is the completion, the last assistant message,
    or the chosen response. Every rank answers its share; the counts are summed over ranks. A prefix- or
    prompt-tuned model answers through :class:`align.generation.CachedGenerator`, which places its virtual
    tokens as training did (peft's ``generate`` does not: :mod:`align.generation`).
    """
    prompts = [tokenize.tokenize_prompt(row, row["_format"], tokenizer, max_prompt_length) for row in rows]
    prompts = [p for p in prompts if p.get("reference") is not None]
    if not prompts:
        return float("nan")
    mine, counted = rank_share(prompts, rank)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    virtual_tokens = is_prompt_learning(model)
    correct = total = 0
    try:
        for begin in range(0, len(mine), batch_size):
            chunk = mine[begin : begin + batch_size]
            if virtual_tokens:
                greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
                answers = [c.text for c in CachedGenerator(model, tokenizer, synced=synced_gpus).generate(
                    [item["prompt_input_ids"] for item in chunk], greedy)]
            else:
                batch = collate.collate_prompts(chunk, tokenizer.pad_token_id)
                output = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=synced_gpus,
                )
                answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for item, answer, keep in zip(chunk, answers, counted[begin : begin + batch_size]):
                if keep:
                    total += 1
                    correct += int(answer.strip() == item["reference"].strip())
    finally:
        model.train(was_training)
    correct, total = all_reduce_sum([correct, total])
    return correct / max(total, 1)
