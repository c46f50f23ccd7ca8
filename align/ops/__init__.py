"""Shared tensor maths: token log-probs, masked reductions, loss aggregation."""

from align.ops.advantages import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    KLEstimator,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    rloo_advantages,
    token_rewards,
)
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
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "KLEstimator",
    "accumulation_scale",
    "gae",
    "global_count",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "rloo_advantages",
    "sequence_logprobs",
    "token_logprobs",
    "token_rewards",
]
