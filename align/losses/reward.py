"""Pairwise (Bradley–Terry) reward-model loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def pairwise_reward_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Bradley–Terry negative log-likelihood that the chosen response is preferred.

    ``loss = -log σ(r_chosen - r_rejected - margin)``

    Ouyang et al. 2022 (InstructGPT), Eq. 1; the ``margin`` term is the Llama 2 variant
    (Touvron et al. 2023, Eq. 2), a per-pair offset that grows with how strongly annotators
    preferred the chosen response.

    Args:
        chosen_rewards: (batch,) scalar reward of each chosen response.
        rejected_rewards: (batch,) scalar reward of each rejected response.
        margin: (batch,) or None (no margin).

    Returns:
        (batch,) per-pair losses, unreduced. ``logsigmoid`` keeps large negative differences finite.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """(batch,) detached float: 1.0 where the chosen reward is strictly higher, 0.0 otherwise (ties too)."""
    return (chosen_rewards.detach() > rejected_rewards.detach()).float()
