"""PPO and GRPO/RLOO losses on per-token log-probs.

Per-token inputs are (batch, seq) over the response tokens, aligned with each other (position t of
``logps`` scores the same token as position t of ``old_logps``), with ``mask`` nonzero on the tokens
that count. Every loss returns its *token sum* and the token count, like ``sft_loss``: the stage
multiplies the sum by ``align.ops.accumulation_scale`` with the global token count, so each token of
the optimizer step weighs the same whatever the micro-batch split. Metrics are returned as detached
sums over the same tokens; divide by the (global) token count to log them as means.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from align.ops.advantages import KLEstimator, kl_estimate, kl_k3
from align.ops.logprobs import masked_sum


class PolicyLossOutput(NamedTuple):
    """Clipped-surrogate loss of one micro-batch, as sums over its masked tokens."""

    loss_sum: Tensor
    """Differentiable scalar ``sum_t mask · max(-A·ρ, -A·clip(ρ))``."""
    token_count: Tensor
    """Detached int64 number of masked tokens."""
    clipped_tokens: Tensor
    """Detached count of tokens where the clipped term is the larger one (its gradient is 0)."""
    approx_kl_sum: Tensor
    """Detached sum of ``k3`` estimates of ``KL(π_old ‖ π)`` (samples come from π_old)."""
    ratio_sum: Tensor
    """Detached sum of ``ρ = π / π_old``."""


class ValueLossOutput(NamedTuple):
    """Clipped value loss of one micro-batch, as sums over its masked tokens."""

    loss_sum: Tensor
    """Differentiable scalar ``sum_t mask · ½ max((V - R)², (V_clip - R)²)``."""
    token_count: Tensor
    """Detached int64 number of masked tokens."""
    clipped_tokens: Tensor
    """Detached count of tokens where the clipped error is strictly the larger one (gradient 0)."""


class GRPOLossOutput(NamedTuple):
    """GRPO/RLOO loss of one micro-batch, as sums over its masked tokens."""

    loss_sum: Tensor
    """Differentiable scalar: clipped surrogate plus ``kl_coef ·`` KL to the reference, summed."""
    token_count: Tensor
    """Detached int64 number of masked tokens."""
    clipped_tokens: Tensor
    """Detached count of tokens where the clipped term is the larger one."""
    kl_sum: Tensor
    """Detached sum of the per-token KL estimate to the reference (before ``kl_coef``)."""
    ratio_sum: Tensor
    """Detached sum of ``ρ = π / π_old``."""


def _check_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape (batch, seq); got {shapes}")


def _check_clip_eps(clip_eps: float) -> None:
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps!r}")


def _token_count(mask: Tensor) -> Tensor:
    return mask.detach().bool().sum().to(torch.int64)


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` with padded positions set to 0 *before* any maths on them: a masked ``-inf`` or
    NaN would otherwise give NaN gradients through ``exp`` or a square even though the sum drops it."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def _clipped_surrogate(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token ``max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))``, the ratio ρ, and where the clipped term wins."""
    advantages = _masked(advantages.detach().expand_as(logps), mask)
    ratio = torch.exp(_masked(logps - old_logps.detach(), mask))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float
) -> PolicyLossOutput:
    """PPO clipped surrogate, negated to be minimised.

    ``L = sum_t mask_t · max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε))``,  ``ρ_t = exp(log π - log π_old)``

    Schulman et al. 2017 (Proximal Policy Optimization Algorithms), Eq. 7: ``-min(ρA, clip(ρ)A)``.
    ``old_logps`` and ``advantages`` are treated as constants.

    Args:
        logps: (batch, seq) ``log π(y_t)`` under the current policy, differentiable.
        old_logps: (batch, seq) ``log π_old(y_t)`` recorded at sampling time.
        advantages: (batch, seq) per-token advantages (e.g. from ``align.ops.advantages.gae``).
        mask: (batch, seq) nonzero on the response tokens.
        clip_eps: ε > 0.

    Returns:
        :class:`PolicyLossOutput` of sums over the masked tokens. ``clipped_tokens / token_count``
        is the clip fraction counted where the clip binds (TRL's ``pg_clipfrac``).
    """
    _check_shapes(logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    _check_clip_eps(clip_eps)
    per_token, ratio, clip_binds = _clipped_surrogate(logps, old_logps, advantages, mask, clip_eps)
    with torch.no_grad():
        approx_kl = kl_k3(_masked(old_logps, mask), _masked(logps, mask))
    return PolicyLossOutput(
        loss_sum=masked_sum(per_token, mask),
        token_count=_token_count(mask),
        clipped_tokens=masked_sum(clip_binds.to(per_token.dtype), mask).detach(),
        approx_kl_sum=masked_sum(approx_kl, mask).detach(),
        ratio_sum=masked_sum(ratio.detach(), mask),
    )


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float
) -> ValueLossOutput:
    """Clipped value loss.

    ``L = sum_t mask_t · ½ max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, -ε, ε) - R_t)²)``

    As in OpenAI baselines ``ppo2`` and Ziegler et al. 2019's ``lm-human-preferences`` code, the PPO
    set-up InstructGPT follows: the value head gains nothing by moving more than ε from its
    sampling-time estimate. ``old_values`` and ``returns`` are treated as constants.

    Args:
        values: (batch, seq) current value estimates, differentiable.
        old_values: (batch, seq) value estimates at sampling time.
        returns: (batch, seq) targets (e.g. ``returns`` from ``align.ops.advantages.gae``).
        mask: (batch, seq) nonzero on the response tokens.
        clip_eps: ε > 0, in the units of the values.

    Returns:
        :class:`ValueLossOutput` of sums over the masked tokens.
    """
    _check_shapes(values=values, old_values=old_values, returns=returns, mask=mask)
    _check_clip_eps(clip_eps)
    values = _masked(values, mask)
    old_values, returns = _masked(old_values.detach(), mask), _masked(returns.detach(), mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    return ValueLossOutput(
        loss_sum=masked_sum(per_token, mask),
        token_count=_token_count(mask),
        clipped_tokens=masked_sum((clipped_error > unclipped_error).to(per_token.dtype), mask).detach(),
    )


def entropy_from_logits(logits: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed entropy of the next-token distributions at the masked positions.

    ``H_t = logsumexp(z_t) - sum_v softmax(z_t)_v · z_{t,v}`` (= ``-sum_v p_v log p_v``)

    Args:
        logits: (batch, seq, vocab), aligned with ``mask`` (position t is the distribution the
            response token t was sampled from). Computed in float32; this keeps a float32
            (batch, seq, vocab) copy, so call it under ``torch.no_grad()`` when only logging.
        mask: (batch, seq) nonzero where the entropy counts.

    Returns:
        ``(entropy_sum, token_count)``: the scalar sum (differentiable, for an entropy bonus) and
        the detached int64 count; their ratio over the global step is the masked mean.
    """
    if logits.dim() != 3 or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"entropy_from_logits expects logits (batch, seq, vocab) and mask (batch, seq); "
            f"got {tuple(logits.shape)} and {tuple(mask.shape)}"
        )
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
    return masked_sum(entropy, mask), _token_count(mask)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    reference_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    kl_coef: float,
    kl_estimator: KLEstimator = "k3",
) -> GRPOLossOutput:
    """GRPO objective with sequence-level advantages, negated to be minimised.

    ``L = sum_{i,t} mask_{i,t} · [max(-A_i·ρ_{i,t}, -A_i·clip(ρ_{i,t}, 1-ε, 1+ε)) + β · KL_{i,t}]``

    Shao et al. 2024 (DeepSeekMath), Eq. 3, with the KL to the reference as a loss term estimated
    per token by ``k3`` (their Eq. 4) or ``k1``/``k2``. The advantage of sequence i (from
    ``grpo_advantages`` or ``rloo_advantages``) is broadcast over its tokens. The paper averages
    tokens within each sequence (``1/|o_i|``) and then over sequences; here tokens are summed and
    the stage divides by the global token count (the token-level normalisation of Yu et al. 2025,
    DAPO), so long responses are not down-weighted and micro-batch splits do not change the loss.

    Args:
        logps: (batch, seq) ``log π(y_t)``, differentiable.
        old_logps: (batch, seq) ``log π_old(y_t)`` at sampling time.
        reference_logps: (batch, seq) ``log π_ref(y_t)``.
        advantages: (batch,) one advantage per sequence.
        mask: (batch, seq) nonzero on the response tokens.
        clip_eps: ε > 0.
        kl_coef: β ≥ 0; with 0 the reference is not used in the loss (the KL is still reported).
        kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see ``align.ops.advantages``).

    Returns:
        :class:`GRPOLossOutput` of sums over the masked tokens.
    """
    _check_shapes(logps=logps, old_logps=old_logps, reference_logps=reference_logps, mask=mask)
    _check_clip_eps(clip_eps)
    if advantages.shape != logps.shape[:1]:
        raise ValueError(
            f"grpo_loss expects advantages (batch,) = {tuple(logps.shape[:1])}, got {tuple(advantages.shape)}"
        )
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    surrogate, ratio, clip_binds = _clipped_surrogate(logps, old_logps, advantages[:, None], mask, clip_eps)
    kl = kl_estimate(_masked(logps, mask), _masked(reference_logps.detach(), mask), kl_estimator)
    per_token = surrogate + kl_coef * kl if kl_coef > 0 else surrogate
    return GRPOLossOutput(
        loss_sum=masked_sum(per_token, mask),
        token_count=_token_count(mask),
        clipped_tokens=masked_sum(clip_binds.to(surrogate.dtype), mask).detach(),
        kl_sum=masked_sum(kl.detach(), mask),
        ratio_sum=masked_sum(ratio.detach(), mask),
    )
