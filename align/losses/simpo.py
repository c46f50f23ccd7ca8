"""Simple preference optimisation (SimPO): a reference-free margin loss on length-normalised rewards.

Inputs are summed sequence log-probs of shape (batch,) (see ``align.ops.sequence_logprobs``) and the
responses' token counts; the per-pair losses come back unreduced, and the stage sums them and applies
``align.ops.accumulation_scale`` (pairs in the step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from align.losses.dpo import _token_counts


class SimPOOutput(NamedTuple):
    """Per-pair SimPO loss and rewards, each (batch,)."""

    losses: Tensor
    """Differentiable per-pair loss."""
    chosen_rewards: Tensor
    """Detached ``β · log π(y_c|x) / |y_c|``, SimPO's reward of the chosen response."""
    rejected_rewards: Tensor
    """Detached ``β · log π(y_r|x) / |y_r|``."""


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> SimPOOutput:
    """SimPO's per-pair loss on the reward margin less a target margin.

    Meng et al. 2024 (SimPO: Simple Preference Optimization with a Reference-Free Reward): the reward
    is the length-normalised log-likelihood ``r(x, y) = β/|y| · log π(y|x)`` (Eq. 4), and with
    ``m = r(x, y_c) - r(x, y_r) - γ`` the loss is ``-log σ(m)`` (Eq. 6). With ε = ``label_smoothing``
    > 0 it is ``-(1-ε)·log σ(m) - ε·log σ(-m)``, the conservative (cDPO) form that the SimPO
    authors' trainer and TRL's CPOTrainer apply.

    This is TRL 1.16's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (``simpo_gamma`` = γ, the
    margin itself, not γ/β) on log-probs averaged over each response's tokens. TRL adds a behaviour
    cloning NLL on the chosen tokens weighted by ``cpo_alpha``, default 1.0 (CPO-SimPO); plain SimPO
    is ``cpo_alpha=0``. Such a term, if wanted, is ``align.losses.chosen_nll``, added by the stage.

    Args:
        policy_chosen_logps: (batch,) summed ``log π(y_c|x)`` over the chosen response, differentiable.
        policy_rejected_logps: (batch,) summed ``log π(y_r|x)`` over the rejected response.
        chosen_lengths: (batch,) scored chosen tokens, clamped to at least 1.
        rejected_lengths: (batch,) scored rejected tokens, clamped to at least 1.
        beta: β > 0, the reward scale (the paper uses 2 to 10; TRL's default 0.1 is DPO's).
        gamma: γ ≥ 0, the target reward margin (TRL's ``simpo_gamma``, default 0.5).
        label_smoothing: ε in [0, 0.5].

    Returns:
        ``SimPOOutput(losses, chosen_rewards, rejected_rewards)``, each (batch,).

    Raises:
        ValueError: a bad ``beta``, ``gamma`` or ``label_smoothing``.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma must be a finite number >= 0 (the target reward margin), got {gamma!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    chosen_rewards = beta * policy_chosen_logps / _token_counts(chosen_lengths, policy_chosen_logps)
    rejected_rewards = beta * policy_rejected_logps / _token_counts(rejected_lengths, policy_rejected_logps)
    margin = chosen_rewards - rejected_rewards - gamma
    epsilon = label_smoothing
    return SimPOOutput(
        losses=-(1 - epsilon) * F.logsigmoid(margin) - epsilon * F.logsigmoid(-margin),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
    )
