"""Padding-free batches: a micro-batch's sequences laid end to end in one row.

A padded batch of sequences with long-tailed lengths spends most of its compute on padding: eight
rows padded to the longest run ``8 x max`` positions for ``sum`` real ones. A packed batch runs the
``sum`` tokens only, in one ``(1, total)`` row, with position ids restarting at each sequence and
attention kept inside each sequence by :class:`Block` spans (``align.models.packed_attention``).

Only the positions whose next token is scored are projected to the vocabulary
(``score_positions``), so neither padding nor prompts reach the ``(tokens, vocab)`` logits.

A preference pair packs as ``prompt | chosen reply | rejected reply``: the rejected reply's
positions continue from the prompt's end and its queries attend to the prompt and to itself, so the
prompt is encoded once for both replies (prefix sharing, as in Wang et al. 2024, "Accelerating Direct
Preference Optimization with Prefix Sharing"). The last prompt position predicts the first token of
both replies, so it appears twice in ``score_positions``, once with each label.

Everything here is a pure function of token ids and masks; the tensors are on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

Span = tuple[int, int]


@dataclass(frozen=True)
class Block:
    """Queries ``[q_start, q_end)`` of the packed row attend to the keys of the ``kv`` spans laid end to end,
    causally: the last query sees every key, the first sees the keys up to ``len(kv keys) - len(queries)``
    and itself (bottom-right aligned). A plain sequence is one block whose only span is its own range."""

    q_start: int
    q_end: int
    kv: tuple[Span, ...]

    @property
    def self_only(self) -> bool:
        """The queries attend to their own span only: a plain causal block."""
        return self.kv == ((self.q_start, self.q_end),)


@dataclass
class PackedBatch:
    """A micro-batch of ``rows`` sequences in one row of ``total`` tokens.

    ``input_ids`` and ``position_ids`` are ``(1, total)``; ``blocks`` tile ``[0, total)`` in order.
    ``score_positions``, ``score_labels`` and ``score_rows`` are ``(scored,)``: the packed position whose
    logits predict a scored token, that token, and the sequence it belongs to (``0 .. rows-1``, in the
    order the sequences were given). ``tokens`` counts the tokens of the sequences as given (a shared
    prompt counts once per sequence), the figure a padded batch's attention mask would sum to.
    """

    input_ids: Tensor
    position_ids: Tensor
    blocks: tuple[Block, ...]
    score_positions: Tensor
    score_labels: Tensor
    score_rows: Tensor
    rows: int
    tokens: int

    def to(self, device: torch.device) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({name: value.to(device) for name, value in moved.items() if isinstance(value, Tensor)})
        return PackedBatch(**moved)


class _Builder:
    """Appends sequences to one packed row and records what is scored."""

    def __init__(self):
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.blocks: list[Block] = []
        self.score_positions: list[int] = []
        self.score_labels: list[int] = []
        self.score_rows: list[int] = []
        self.tokens = 0

    def score(self, row: int, where: list[int], ids: list[int], mask: list[int]) -> None:
        """Score ``ids[t + 1]`` from packed position ``where[t]`` for every t with ``mask[t + 1]`` set."""
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                self.score_positions.append(where[t])
                self.score_labels.append(ids[t + 1])
                self.score_rows.append(row)

    def sequence(self, row: int, ids: list[int], mask: list[int]) -> None:
        start = len(self.ids)
        self.ids += ids
        self.positions += range(len(ids))
        self.blocks.append(Block(start, start + len(ids), ((start, start + len(ids)),)))
        self.score(row, list(range(start, start + len(ids))), ids, mask)
        self.tokens += len(ids)

    def shared_prompt_pair(self, rows: tuple[int, int], prompt_length: int, first: tuple[list[int], list[int]],
                           second: tuple[list[int], list[int]]) -> None:
        """Two sequences that begin with the same ``prompt_length`` unscored tokens: the prompt and the
        first reply in one causal block, then the second reply attending to the prompt and itself."""
        (first_ids, first_mask), (second_ids, second_mask) = first, second
        start = len(self.ids)
        first_end = start + len(first_ids)
        self.ids += first_ids + second_ids[prompt_length:]
        self.positions += [*range(len(first_ids)), *range(prompt_length, len(second_ids))]
        self.blocks.append(Block(start, first_end, ((start, first_end),)))
        second_span = (first_end, first_end + len(second_ids) - prompt_length)
        prompt_span = (start, start + prompt_length)
        self.blocks.append(Block(*second_span, tuple(s for s in (prompt_span, second_span) if s[1] > s[0])))
        self.score(rows[0], list(range(start, first_end)), first_ids, first_mask)
        second_where = [*range(start, start + prompt_length), *range(*second_span)]
        self.score(rows[1], second_where, second_ids, second_mask)
        self.tokens += len(first_ids) + len(second_ids)

    def build(self, rows: int) -> PackedBatch:
        if not self.ids:
            raise ValueError("cannot pack an empty micro-batch")
        return PackedBatch(
            input_ids=torch.tensor([self.ids], dtype=torch.long),
            position_ids=torch.tensor([self.positions], dtype=torch.long),
            blocks=tuple(self.blocks),
            score_positions=torch.tensor(self.score_positions, dtype=torch.long),
            score_labels=torch.tensor(self.score_labels, dtype=torch.long),
            score_rows=torch.tensor(self.score_rows, dtype=torch.long),
            rows=rows,
            tokens=self.tokens,
        )


def pack_sft(features: list[dict[str, Any]]) -> PackedBatch:
    """SFT rows (``input_ids``, ``loss_mask``) end to end; sequence ``i`` is row ``i``."""
    builder = _Builder()
    for row, feature in enumerate(features):
        builder.sequence(row, feature["input_ids"], feature["loss_mask"])
    return builder.build(len(features))


def pack_preference(features: list[dict[str, Any]], share_prompt: bool = True) -> PackedBatch:
    """Preference pairs, rows laid out as :func:`align.data.collate.collate_preference` lays them out:
    chosen sequences are rows ``0 .. pairs-1`` and rejected ones ``pairs .. 2*pairs-1``.

    With ``share_prompt`` each pair's prompt (its first ``prompt_length`` tokens, unscored and the same in
    both sequences) is packed once; a pair whose sequences do not begin with the same unscored prompt is
    packed as two sequences.
    """
    builder = _Builder()
    pairs = len(features)
    for i, feature in enumerate(features):
        chosen = (feature["chosen_input_ids"], feature["chosen_loss_mask"])
        rejected = (feature["rejected_input_ids"], feature["rejected_loss_mask"])
        prompt_length = feature.get("prompt_length", 0) if share_prompt else 0
        if prompt_length and _shares_prompt(chosen, rejected, prompt_length):
            builder.shared_prompt_pair((i, pairs + i), prompt_length, chosen, rejected)
        else:
            builder.sequence(i, *chosen)
            builder.sequence(pairs + i, *rejected)
    return builder.build(2 * pairs)


def _shares_prompt(first: tuple[list[int], list[int]], second: tuple[list[int], list[int]], length: int) -> bool:
    (first_ids, first_mask), (second_ids, second_mask) = first, second
    return (
        length < min(len(first_ids), len(second_ids))
        and first_ids[:length] == second_ids[:length]
        and not any(first_mask[:length]) and not any(second_mask[:length])
    )


def sequence_sums(token_values: Tensor, packed: PackedBatch) -> Tensor:
    """(rows,) sums of per-scored-token values ``(scored,)`` over each sequence: summed log-probs
    ``log π(y | x)`` from token log-probs. A sequence with nothing scored sums to 0."""
    sums = token_values.new_zeros(packed.rows)
    return sums.index_add(0, packed.score_rows, token_values)


def scored_counts(packed: PackedBatch) -> Tensor:
    """(rows,) number of scored tokens of each sequence."""
    return torch.bincount(packed.score_rows, minlength=packed.rows)
