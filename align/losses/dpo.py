"""Direct preference optimisation losses and their metrics.

All functions take sequence log-probs of shape (batch,) (see ``align.ops.sequence_logprobs``) and
return per-pair values, unreduced; the stage sums them and applies ``align.ops.accumulation_scale``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from align.losses.reward import pairwise_accuracy

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


class DPOOutput(NamedTuple):
    """Per-pair DPO loss and implicit rewards, each (batch,)."""

    losses: Tensor
    """Differentiable per-pair loss."""
    chosen_rewards: Tensor
    """Detached ``β · (log π(y_c|x) - log π_ref(y_c|x))``."""
    rejected_rewards: Tensor
    """Detached ``β · (log π(y_r|x) - log π_ref(y_r|x))``."""


def _check_arguments(beta: float, loss_type: str, label_smoothing: float, lengths_given: bool) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if loss_type not in get_args(DPOLossType):
        raise ValueError(f"loss_type must be one of {list(get_args(DPOLossType))}, got {loss_type!r}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5] for loss_type 'sigmoid' (cDPO), got {label_smoothing!r}"
        )
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must be in [0, 0.5) for loss_type 'robust' (rDPO divides by "
            f"1 - 2·label_smoothing), got {label_smoothing!r}"
        )
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing applies only to loss_type 'sigmoid' and 'robust'; "
            f"got label_smoothing={label_smoothing!r} with loss_type {loss_type!r}"
        )
    if loss_type == "ipo" and not lengths_given:
        raise ValueError(
            "loss_type 'ipo' averages log-probs over response tokens: pass chosen_lengths and "
            "rejected_lengths, the (batch,) counts of scored chosen and rejected tokens"
        )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> DPOOutput:
    """Preference loss on the log-ratio margin between chosen and rejected responses.

    With ``h = (log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))``, β = ``beta``
    and ε = ``label_smoothing``:

    - ``sigmoid``: ``-(1-ε)·log σ(βh) - ε·log σ(-βh)``. Rafailov et al. 2023 (DPO), Eq. 7;
      ε > 0 is conservative DPO (Mitchell 2023, cDPO): the label is assumed flipped with
      probability ε. Requires 0 ≤ ε ≤ 0.5.
    - ``robust``: ``((1-ε)·(-log σ(βh)) + ε·log σ(-βh)) / (1 - 2ε)``. Chowdhury et al. 2024
      (rDPO), an unbiased estimate of the clean-label loss under flip rate ε. Requires 0 ≤ ε < 0.5.
    - ``hinge``: ``relu(1 - βh)``. SLiC-HF (Zhao et al. 2023) with the reference log-ratio; 1/β is
      the margin.
    - ``ipo``: ``(h̄ - 1/(2β))²``. Azar et al. 2023 (IPO), Eq. 17, β playing τ, with h̄ the margin
      of length-averaged log-probs: each of the four log-probs divided by its response's token
      count (``chosen_lengths`` for both chosen terms, ``rejected_lengths`` for both rejected
      ones). The paper's equation does not spell the averaging out; TRL uses it and reports that
      the IPO authors confirmed it is the form behind the paper's results. Summed log-probs
      would let the margin, and so the loss, grow with response length against a fixed target
      1/(2β).

    The implicit rewards are ``β · (log π(y|x) - log π_ref(y|x))`` on summed log-probs for every
    loss type, ipo included, as TRL reports them: one reward scale across loss types.

    Args:
        policy_chosen_logps: (batch,) summed ``log π(y_c|x)``, differentiable.
        policy_rejected_logps: (batch,) summed ``log π(y_r|x)``, differentiable.
        reference_chosen_logps: (batch,) summed ``log π_ref(y_c|x)``.
        reference_rejected_logps: (batch,) summed ``log π_ref(y_r|x)``.
        beta: β > 0, strength of the KL constraint to the reference.
        loss_type: one of ``DPOLossType``.
        label_smoothing: ε, only for ``sigmoid`` and ``robust``.
        chosen_lengths: (batch,) scored chosen tokens, clamped to at least 1. Required for
            ``ipo``, ignored by the other loss types.
        rejected_lengths: (batch,) scored rejected tokens, as ``chosen_lengths``.

    Returns:
        ``DPOOutput(losses, chosen_rewards, rejected_rewards)``, each (batch,).

    Raises:
        ValueError: a bad ``beta``, ``loss_type`` or ``label_smoothing``, or ``ipo`` without
            ``chosen_lengths`` and ``rejected_lengths``.
    """
    _check_arguments(
        beta, loss_type, label_smoothing, chosen_lengths is not None and rejected_lengths is not None
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    h = chosen_logratios - rejected_logratios
    epsilon = label_smoothing

    if loss_type == "sigmoid":
        losses = -(1 - epsilon) * F.logsigmoid(beta * h) - epsilon * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = ((1 - epsilon) * -F.logsigmoid(beta * h) + epsilon * F.logsigmoid(-beta * h)) / (
            1 - 2 * epsilon
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        averaged_h = chosen_logratios / _token_counts(chosen_lengths, h) - rejected_logratios / _token_counts(
            rejected_lengths, h
        )
        losses = (averaged_h - 1 / (2 * beta)) ** 2

    return DPOOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def _token_counts(lengths: Tensor, like: Tensor) -> Tensor:
    """(batch,) token counts as ``like``'s dtype and device, at least 1 (an empty response scores 0)."""
    return lengths.to(device=like.device, dtype=like.dtype).clamp(min=1)


def chosen_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood of the chosen response, ``-log π(y_c|x) / |y_c|``.

    The NLL term of RPO (Pang et al. 2024, Iterative Reasoning Preference Optimization): the
    stage adds ``α · chosen_nll`` to each pair's DPO loss to keep the chosen responses likely, so
    the batch term is the mean over pairs of each pair's per-token NLL, as in the paper. Every
    pair weighs the same whatever its length, and the term shares the DPO loss's unit (pairs),
    so one pair-count normalisation (``align.ops.accumulation_scale``) covers both and the step's
    loss does not depend on its split into micro-batches. TRL's ``sft`` term (its RPO) instead
    averages over all chosen tokens of a batch, weighting a pair by its length.

    Args:
        policy_chosen_logps: (batch,) summed log-probs of the scored chosen tokens.
        chosen_lengths: (batch,) number of scored chosen tokens; clamped to at least 1.

    Returns:
        (batch,) differentiable per-pair NLL.
    """
    return -policy_chosen_logps / _token_counts(chosen_lengths, policy_chosen_logps)


def implicit_reward_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """(batch,) detached float: 1.0 where the implicit chosen reward is strictly higher (ties 0)."""
    return pairwise_accuracy(chosen_rewards, rejected_rewards)
