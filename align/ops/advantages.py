"""Advantages, returns, KL estimators and KL-coefficient controllers for the online RL stages.

Per-token tensors are (batch, seq) over the *response* tokens only, right-padded: ``mask`` is nonzero
on the real tokens of each response and zero on the padding after it. Per-sequence tensors are
(batch,). Group methods (GRPO, RLOO) take rewards of shape (num_prompts * group_size,) with the
samples of one prompt contiguous, the order in which ``align.generation`` returns them.

Whitening is :func:`align.ops.masked_whiten` (PPO's advantages take its mean and variance over
every micro-batch on every rank); it is not repeated here.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape (batch, seq); got {shapes}")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded response tokens.

    ``δ_t = r_t + γ · V_{t+1} - V_t``,  ``A_t = δ_t + γλ · A_{t+1}``,  ``R_t = A_t + V_t``

    Schulman et al. 2016 (High-Dimensional Continuous Control Using GAE), Eq. 16, with the sum
    truncated at the end of each response: past the last real token ``V_{t+1} = A_{t+1} = 0``
    (the episode ends there, no bootstrapping). Rewards and values at padded positions are ignored,
    even if NaN.

    Args:
        rewards: (batch, seq) per-token rewards (see :func:`token_rewards`).
        values: (batch, seq) value estimates ``V(s_t)`` of the old policy.
        mask: (batch, seq) nonzero on the response tokens; right padding only (a zero inside a
            response would end the episode there).
        gamma: discount γ in [0, 1].
        lam: GAE λ in [0, 1].

    Returns:
        ``(advantages, returns)``, each (batch, seq), detached, float32 (float64 if ``values`` is),
        0 at padded positions.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    keep = mask.detach().bool()
    zero = torch.zeros((), dtype=dtype, device=values.device)
    rewards = torch.where(keep, rewards.detach().to(dtype), zero)
    values = torch.where(keep, values.detach().to(dtype), zero)

    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, zero)
        advantages[:, t] = advantage
        # values[:, t] is already 0 at padding, so the last real token bootstraps from nothing.
        next_value, next_advantage = values[:, t], advantage
    returns = torch.where(keep, advantages + values, zero)
    return advantages, returns


def kl_k1(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """Per-token ``k1 = -log r = log π(y_t) - log π_ref(y_t)``, with ``r = π_ref / π``.

    Schulman 2020, "Approximating KL Divergence": unbiased for ``KL(π ‖ π_ref)`` when the tokens are
    sampled from π, high variance, and negative on some tokens. Shapes (batch, seq) in and out.
    """
    return logps - reference_logps


def kl_k2(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """Per-token ``k2 = ½ (log r)²`` with ``r = π_ref / π``.

    Schulman 2020: biased but low variance and always ≥ 0; its gradient in expectation is that of
    the reverse KL only to first order. Shapes (batch, seq) in and out.
    """
    return 0.5 * (reference_logps - logps) ** 2


def kl_k3(logps: Tensor, reference_logps: Tensor) -> Tensor:
    """Per-token ``k3 = (r - 1) - log r`` with ``r = π_ref / π``.

    Schulman 2020: unbiased for ``KL(π ‖ π_ref)`` under samples from π (``E_π[r - 1] = 0``), low
    variance, and ≥ 0 everywhere since ``log r ≤ r - 1``; the GRPO penalty (Shao et al. 2024,
    DeepSeekMath, Eq. 4). ``r - 1`` is computed as ``expm1(log r)`` so values near r = 1 do not
    cancel to a small negative number. Shapes (batch, seq) in and out.
    """
    log_ratio = reference_logps - logps
    return torch.expm1(log_ratio) - log_ratio


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logps: Tensor, reference_logps: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL estimate ``kl_k1``, ``kl_k2`` or ``kl_k3`` chosen by name; (batch, seq)."""
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {list(get_args(KLEstimator))}, got {estimator!r}")
    return _KL_ESTIMATORS[estimator](logps, reference_logps)


def token_rewards(score: Tensor, kl_per_token: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token PPO reward: a KL penalty on every token, the sequence score on the last one.

    ``r_t = -β · KL_t + [t = T] · score``, with T the last real token of the response.

    Ziegler et al. 2019 (Fine-Tuning Language Models from Human Preferences), Eq. 1 and §2.2;
    Ouyang et al. 2022 (InstructGPT), Eq. 2, which spreads the penalty over tokens this way.

    Args:
        score: (batch,) reward-model score of each response.
        kl_per_token: (batch, seq) KL estimate per token (e.g. :func:`kl_k1`).
        mask: (batch, seq) nonzero on the response tokens (right-padded).
        kl_coef: β ≥ 0.

    Returns:
        (batch, seq) detached rewards, 0 at padded positions. A response with no tokens gets no
        score (there is no token to put it on).
    """
    if score.dim() != 1 or score.shape[0] != kl_per_token.shape[0]:
        raise ValueError(
            f"token_rewards expects score (batch,) and kl_per_token (batch, seq); "
            f"got {tuple(score.shape)} and {tuple(kl_per_token.shape)}"
        )
    _check_same_shape(kl_per_token=kl_per_token, mask=mask)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    keep = mask.detach().bool()
    dtype = torch.promote_types(torch.promote_types(score.dtype, kl_per_token.dtype), torch.float32)
    zero = torch.zeros((), dtype=dtype, device=kl_per_token.device)
    rewards = torch.where(keep, -kl_coef * kl_per_token.detach().to(dtype), zero)
    positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    last = torch.where(keep, positions, -1).max(dim=1).values
    has_tokens = last >= 0
    rows = torch.arange(keep.shape[0], device=keep.device)[has_tokens]
    rewards[rows, last[has_tokens]] += score.detach().to(dtype)[has_tokens]
    return rewards


class KLController(Protocol):
    """Holds the KL coefficient β and updates it after each rollout batch."""

    coef: float

    def update(self, current_kl: float, n_steps: int) -> float: ...


class FixedKLController:
    """A constant KL coefficient; :meth:`update` changes nothing."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {coef!r}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.coef


class AdaptiveKLController:
    """Proportional control of β towards a target KL.

    ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``,  ``β_{t+1} = β_t · (1 + K_β · e_t)``

    Ziegler et al. 2019, Eq. 2, with ``K_β = n_steps / horizon`` as in their code and TRL: β changes
    by at most a factor ``1 ± 0.2`` per ``horizon`` samples.

    Args:
        init_coef: β_0 ≥ 0.
        target: KL_target > 0, in the same units as the ``current_kl`` passed to :meth:`update`
            (typically the per-sequence KL summed over tokens).
        horizon: samples over which β may change by the full ±20 %; > 0.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0:
            raise ValueError(f"init_coef must be >= 0, got {init_coef!r}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target!r}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon!r}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the measured KL of the last ``n_steps`` samples; returns the new β."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + proportional_error * n_steps / self.horizon
        return self.coef


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (num_prompts * group_size,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group baseline needs other samples), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.detach().reshape(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Group-relative advantages: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    Shao et al. 2024 (DeepSeekMath), §4.1.2, outcome supervision; ``std`` is the unbiased sample
    standard deviation, as in TRL and OpenRLHF. ``scale=False`` drops the division
    (Liu et al. 2025, Dr. GRPO), which stops groups with near-equal rewards getting large advantages.

    Args:
        rewards: (num_prompts * group_size,) scalar reward per sample, groups contiguous.
        group_size: samples per prompt (≥ 2).
        eps: added to the standard deviation; a group with equal rewards gets advantages 0.

    Returns:
        (num_prompts * group_size,) detached advantages, one per sample.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages: ``A_i = r_i - (1/(k-1)) · sum_{j≠i} r_j``.

    Ahmadian et al. 2024 (Back to Basics: Revisiting REINFORCE Style Optimization for Learning from
    Human Feedback in LLMs), Eq. 6 (Kool et al. 2019); equal to ``k/(k-1) · (r_i - mean(r))``.

    Args:
        rewards: (num_prompts * group_size,) scalar reward per sample, groups contiguous.
        group_size: k, samples per prompt (≥ 2).

    Returns:
        (num_prompts * group_size,) detached advantages.
    """
    groups = _grouped(rewards, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)
