"""Padding tokenized features into batches.

Training batches are right-padded; prompts for generation are left-padded so that every prompt ends
at the last column and new tokens are appended after it. Padded positions have attention 0 and loss 0
whatever the pad id is, so a pad token equal to the EOS token is safe.
"""

from typing import Any, Literal

import torch


def pad_sequences(
    seqs: list[list[int]], pad_value: int, side: Literal["right", "left"] = "right"
) -> torch.LongTensor:
    """Stack sequences of different lengths into a ``(batch, max_len)`` tensor filled with ``pad_value``."""
    if not seqs:
        raise ValueError("cannot pad an empty list of sequences")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    max_len = max(len(seq) for seq in seqs)
    padded = torch.full((len(seqs), max_len), pad_value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if not seq:
            continue
        values = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            padded[row, : len(seq)] = values
        else:
            padded[row, max_len - len(seq) :] = values
    return padded


def _attention_masks(seqs: list[list[int]], side: Literal["right", "left"] = "right") -> torch.LongTensor:
    return pad_sequences([[1] * len(seq) for seq in seqs], 0, side)


def collate_sft(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``loss_mask``, each ``(batch, seq)``, right-padded."""
    input_ids = [feature["input_ids"] for feature in features]
    return {
        "input_ids": pad_sequences(input_ids, pad_id),
        "attention_mask": _attention_masks(input_ids),
        "loss_mask": pad_sequences([feature["loss_mask"] for feature in features], 0),
    }


def collate_preference(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected sequences in one ``(2 * batch, seq)`` batch for a single forward pass.

    Rows ``0 .. batch-1`` are the chosen sequences and rows ``batch .. 2*batch-1`` the rejected ones,
    in the same order, right-padded to the longest of all of them.
    """
    input_ids = [feature["chosen_input_ids"] for feature in features]
    input_ids += [feature["rejected_input_ids"] for feature in features]
    loss_masks = [feature["chosen_loss_mask"] for feature in features]
    loss_masks += [feature["rejected_loss_mask"] for feature in features]
    return {
        "input_ids": pad_sequences(input_ids, pad_id),
        "attention_mask": _attention_masks(input_ids),
        "loss_mask": pad_sequences(loss_masks, 0),
    }


def collate_prompts(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts, ``(batch, prompt_len)``, left-padded for generation."""
    prompt_ids = [feature["prompt_input_ids"] for feature in features]
    return {
        "input_ids": pad_sequences(prompt_ids, pad_id, side="left"),
        "attention_mask": _attention_masks(prompt_ids, side="left"),
    }
