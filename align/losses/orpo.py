"""Odds-ratio preference optimisation (ORPO): SFT on the chosen response plus an odds-ratio penalty.

Reference-model free. Inputs are summed sequence log-probs of shape (batch,) (see
``align.ops.sequence_logprobs``) and the responses' token counts; the per-pair losses come back
unreduced, and the stage sums them and applies ``align.ops.accumulation_scale`` (pairs in the step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from align.losses.dpo import _token_counts

_LN2 = math.log(2.0)


class ORPOOutput(NamedTuple):
    """Per-pair ORPO loss, its two terms and its metrics, each (batch,)."""

    losses: Tensor
    """Differentiable ``nll + β · odds_ratio_loss``."""
    nll: Tensor
    """Detached ``-log π(y_c|x) / |y_c|``, the SFT term."""
    odds_ratio_loss: Tensor
    """Detached ``-log σ(log_odds_ratio)``, the odds-ratio term before the weight β."""
    log_odds_ratio: Tensor
    """Detached ``log odds(y_c|x) - log odds(y_r|x)``."""
    log_odds_chosen: Tensor
    """Detached ``log odds(y_c|x)`` of the chosen response alone."""
    chosen_rewards: Tensor
    """Detached ``β · log π(y_c|x) / |y_c|``, as TRL reports ORPO's rewards."""
    rejected_rewards: Tensor
    """Detached ``β · log π(y_r|x) / |y_r|``."""


def log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x < 0, accurate over the whole range.

    Mächler 2012, "Accurately computing log(1 - exp(-|a|))": ``log(-expm1(x))`` for x ≥ -ln 2,
    where ``1 - exp(x)`` would cancel, and ``log1p(-exp(x))`` below, where ``expm1`` would round to
    -1. Each branch is evaluated only on the inputs it serves (the other's are replaced by -ln 2), so
    neither branch's infinities reach the other's gradient through ``torch.where``. -inf at x = 0.
    """
    near_zero = x >= -_LN2
    at_split = torch.full_like(x, -_LN2)
    return torch.where(
        near_zero,
        torch.log(-torch.expm1(torch.where(near_zero, x, at_split))),
        torch.log1p(-torch.exp(torch.where(near_zero, at_split, x))),
    )


def _below_zero(mean_logps: Tensor) -> Tensor:
    """``mean_logps`` with values above -tiny (0 itself: an empty response, or every token certain in
    this precision) moved to -tiny, the smallest normal number, the gradient passing through unchanged.

    At exactly 0 the odds are infinite and their gradient ``0 · ∞``; at -tiny the log odds are
    -log(tiny) (87 in float32, 708 in float64) and finite. Below -tiny nothing changes.
    """
    tiny = torch.finfo(mean_logps.dtype).tiny
    return mean_logps - (mean_logps + tiny).clamp(min=0).detach()


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log(p / (1 - p))`` with ``log p = mean_logps``: ``mean_logps - log1m_exp(mean_logps)``.

    ``mean_logps`` at or above -tiny (see ``_below_zero``) is taken as -tiny, so the result is finite.
    """
    mean_logps = _below_zero(mean_logps)
    return mean_logps - log1m_exp(mean_logps)


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float,
) -> ORPOOutput:
    """ORPO's per-pair loss ``L_SFT + λ · L_OR``.

    Hong et al. 2024 (ORPO: Monolithic Preference Optimization without Reference Model). The
    paper's likelihood is length-averaged, ``log P(y|x) = log π(y|x) / |y|``, its odds are
    ``odds(y|x) = P(y|x) / (1 - P(y|x))``, and with λ = ``beta``:

    - ``L_OR = -log σ(log(odds(y_c|x) / odds(y_r|x)))`` (Eq. 7, the odds ratio of Eq. 4),
    - ``L_SFT = -log π(y_c|x) / |y_c|``, the chosen response's per-token NLL,
    - ``L_ORPO = L_SFT + λ · L_OR`` (Eq. 6).

    ``log odds = log P - log(1 - P)`` is computed from the log-prob with ``log1m_exp``, never from
    P, so it stays accurate when P is near 0 and near 1 (length-averaged log-prob near 0). A mean
    log-prob of exactly 0 (an empty response, or every token certain in the working precision) is
    taken at -tiny (see ``log_odds``): finite values where TRL gives inf or NaN, and finite gradients
    (TRL's are NaN from a mean log-prob of about -3e-8 up in float32) except when both responses of
    a pair are at 0, where the exact gradient is unbounded (1e37 or inf). The working precision
    is float32 or float64 as given, float32 for bf16 and fp16 (TRL always uses float32).

    The odds-ratio term is TRL 1.16's ``ORPOTrainer.odds_ratio_loss`` with ``beta`` as λ. The SFT
    term is each pair's chosen per-token NLL (``align.losses.chosen_nll``), so the stage's mean over
    pairs is the paper's per-example L_SFT. TRL instead averages the NLL over all the batch's chosen
    tokens at once, prompt tokens included, so a pair counts by its prompt and response length.

    Args:
        policy_chosen_logps: (batch,) summed ``log π(y_c|x)`` over the chosen response, differentiable.
        policy_rejected_logps: (batch,) summed ``log π(y_r|x)`` over the rejected response.
        chosen_lengths: (batch,) scored chosen tokens, clamped to at least 1.
        rejected_lengths: (batch,) scored rejected tokens, clamped to at least 1.
        beta: λ > 0, the weight of the odds-ratio term (TRL's ``ORPOConfig.beta``, default 0.1).

    Returns:
        ``ORPOOutput``, each field (batch,).

    Raises:
        ValueError: a bad ``beta``.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (ORPO's λ), got {beta!r}")
    compute_dtype = torch.promote_types(policy_chosen_logps.dtype, torch.float32)
    chosen = policy_chosen_logps.to(compute_dtype)
    rejected = policy_rejected_logps.to(compute_dtype)
    chosen_mean = chosen / _token_counts(chosen_lengths, chosen)
    rejected_mean = rejected / _token_counts(rejected_lengths, rejected)

    log_odds_chosen = log_odds(chosen_mean)
    log_odds_ratio = log_odds_chosen - log_odds(rejected_mean)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
    nll = -chosen_mean
    return ORPOOutput(
        losses=nll + beta * odds_ratio_loss,
        nll=nll.detach(),
        odds_ratio_loss=odds_ratio_loss.detach(),
        log_odds_ratio=log_odds_ratio.detach(),
        log_odds_chosen=log_odds_chosen.detach(),
        chosen_rewards=beta * chosen_mean.detach(),
        rejected_rewards=beta * rejected_mean.detach(),
    )
