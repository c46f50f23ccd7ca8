"""Shared tensor maths: token log-probs, masked reductions, loss aggregation."""

from align.ops.aggregate import accumulation_scale, global_count
from align.ops.logprobs import (
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "accumulation_scale",
    "global_count",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "sequence_logprobs",
    "token_logprobs",
]
