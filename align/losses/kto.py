"""Kahneman–Tversky optimisation (KTO) loss on unpaired desirable and undesirable responses.

Each row is one (prompt, completion, label) example in TRL's unpaired layout: ``label`` True for a
desirable completion, False for an undesirable one. Inputs are sequence log-probs of shape (batch,)
(see ``align.ops.sequence_logprobs``); the per-row losses come back unreduced, and the stage sums them
and applies ``align.ops.accumulation_scale`` (rows in the step), as for DPO.

The reference point z₀ comes from the same micro-batch with its completions paired to the wrong
prompts (``mismatched_completion_index``): ``kto_kl_estimate`` gives the micro-batch's estimate, the
stage averages it over data-parallel ranks, and ``kto_loss`` clamps the average at 0 and detaches it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class KTOOutput(NamedTuple):
    """Per-row KTO loss and implicit rewards, each (batch,), and the reference point used."""

    losses: Tensor
    """Differentiable per-row loss, already multiplied by the row's desirable or undesirable weight."""
    rewards: Tensor
    """Detached ``β · (log π(y|x) - log π_ref(y|x))`` of every row (z₀ not subtracted)."""
    reference_point: Tensor
    """Detached scalar z₀ = ``max(0, kl_estimate)``."""


def mismatched_completion_index(batch_size: int) -> Tensor:
    """(batch_size,) int64 index pairing prompt i with completion ``(i - 1) mod batch_size``.

    Row i of the KL batch is prompt i followed by completion ``index[i]`` of the same micro-batch:
    ``[n-1, 0, 1, ..., n-2]``, the rotation by one that TRL 1.16's KTOTrainer applies within each
    chunk of ``per_device_train_batch_size`` rows (``KL_completion_ids = [y_n, y_1, ..., y_{n-1}]``),
    so that the mismatched completions are the same set as the matched ones, each under another
    prompt (Ethayarajh et al. 2024, §4.1).

    Raises:
        ValueError: ``batch_size`` below 2, where every completion would keep its own prompt and the
            estimate would be the rows' implied reward rather than a KL term.
    """
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(
            f"batch_size must be an int >= 2 to pair completions with other prompts for the KTO "
            f"reference point, got {batch_size!r}"
        )
    return torch.roll(torch.arange(batch_size), shifts=1)


def kto_kl_estimate(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    """Detached scalar ``mean_i [log π(y'_i|x_i) - log π_ref(y'_i|x_i)]`` over mismatched pairs.

    The micro-batch's estimate of ``KL(π(y'|x) || π_ref(y'|x))`` before clamping, as TRL 1.16's
    KTOTrainer computes it: a plain mean over the micro-batch's KL rows. Across data-parallel ranks
    TRL gathers each rank's mean and averages those means (every rank counts the same whatever its
    row count), then clamps at 0; the stage does the same with an all-reduce average of this value
    before passing it to ``kto_loss``, which clamps. Clamping each rank's estimate first would
    differ whenever the ranks' signs differ.

    Args:
        policy_kl_logps: (batch,) summed ``log π(y'|x)`` of mismatched (prompt, completion) rows.
        reference_kl_logps: (batch,) summed ``log π_ref(y'|x)`` of the same rows.

    Returns:
        0-dim detached tensor.
    """
    if policy_kl_logps.shape != reference_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(
            f"policy_kl_logps and reference_kl_logps must both be (batch,); got "
            f"{tuple(policy_kl_logps.shape)} and {tuple(reference_kl_logps.shape)}"
        )
    if policy_kl_logps.numel() == 0:
        raise ValueError("policy_kl_logps is empty: the KTO reference point needs at least one mismatched row")
    return (policy_kl_logps.detach() - reference_kl_logps.detach()).mean()


def _check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOOutput:
    """KTO's per-row loss ``λ_y - v(x, y)``.

    Ethayarajh et al. 2024 (KTO: Model Alignment as Prospect Theoretic Optimization), Eq. 7: with
    ``r = log π(y|x) - log π_ref(y|x)``, reference point ``z₀ = max(0, KL estimate)`` (no gradient),
    β = ``beta``, λ_D = ``desirable_weight`` and λ_U = ``undesirable_weight``:

    - desirable row:   ``λ_D · (1 - σ(β · (r - z₀)))``
    - undesirable row: ``λ_U · (1 - σ(β · (z₀ - r)))``

    This is TRL 1.16's ``loss_type="kto"`` term by term (its batch loss is the mean of these rows);
    the APO variant is not implemented. A batch of only desirable (or only undesirable) rows is
    valid: each row's loss uses only its own label, and z₀ still comes from the mismatched pairs.
    KTO's paper (Eq. 8) advises ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3] for n_D desirable and n_U
    undesirable examples.

    Args:
        policy_logps: (batch,) summed ``log π(y|x)`` of each row's completion, differentiable.
        reference_logps: (batch,) summed ``log π_ref(y|x)``.
        desirable: (batch,) bool, True where the row is desirable (TRL's ``label`` column).
        kl_estimate: the KL estimate of ``kto_kl_estimate``, averaged over data-parallel ranks:
            a 0-dim tensor or a float. Clamped at 0 and detached here.
        beta: β > 0, strength of the KL constraint to the reference.
        desirable_weight: λ_D ≥ 0.
        undesirable_weight: λ_U ≥ 0.

    Returns:
        ``KTOOutput(losses, rewards, reference_point)``.

    Raises:
        ValueError: a bad ``beta``, ``desirable_weight`` or ``undesirable_weight``, a ``desirable``
            that is not a bool tensor of ``policy_logps``'s shape, or a ``kl_estimate`` with more
            than one element.
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    _check_weight("desirable_weight", desirable_weight)
    _check_weight("undesirable_weight", undesirable_weight)
    if desirable.dtype != torch.bool or desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable must be a bool tensor of shape {tuple(policy_logps.shape)} (True for a desirable row), "
            f"got {desirable.dtype} {tuple(desirable.shape)}"
        )
    kl_estimate = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device)
    if kl_estimate.numel() != 1:
        raise ValueError(
            f"kl_estimate must be one number (the batch's KL estimate, averaged over ranks), got shape "
            f"{tuple(kl_estimate.shape)}"
        )
    reference_point = kl_estimate.detach().reshape(()).clamp(min=0)

    logratios = policy_logps - reference_logps
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    return KTOOutput(
        losses=torch.where(desirable, desirable_losses, undesirable_losses),
        rewards=beta * logratios.detach(),
        reference_point=reference_point,
    )
