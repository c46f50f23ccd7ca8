"""KTO, ORPO and SimPO losses: hand-worked numbers, edge cases, and parity with TRL 1.16.

The parity tests call TRL's own loss code on identical float64 log-probs (TRL comes with the dev
extra): ``KTOTrainer._compute_loss`` on a stand-in policy, ``ORPOTrainer.odds_ratio_loss`` and
``get_batch_loss_metrics``, and ``CPOTrainer.cpo_loss`` and ``get_batch_loss_metrics`` with
``loss_type="simpo"``. Each trainer is made with ``__new__`` and given the attributes its ``__init__``
copies from its config. Loss values and gradients with respect to the log-probs agree within 1e-6.
"""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal, localcontext
from types import SimpleNamespace

import pytest
import torch

from align.losses import (
    KTOOutput,
    ORPOOutput,
    SimPOOutput,
    kto_kl_estimate,
    kto_loss,
    mismatched_completion_index,
    orpo_loss,
    simpo_loss,
)
from align.losses.orpo import log1m_exp

LN2 = math.log(2.0)
LN3 = math.log(3.0)
LN4 = math.log(4.0)
BATCH = 64
BETAS = [0.1, 0.5, 1.0]
TRL_TOLERANCE = 1e-6


def _logps(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# --- KTO: hand-worked -------------------------------------------------------------------------


def test_kto_hand_worked_with_the_reference_point_clamped_to_zero():
    """β = 1, kl_estimate -0.3, so z₀ = max(0, -0.3) = 0; σ(ln 3) = 3/4.

    Row 1 desirable,   r = (-2 + ln 3) - (-2) = ln 3:  λ_D·(1 - σ(r - z₀)) = 1·(1 - 3/4) = 0.25.
    Row 2 undesirable, r = -5 - (-5 + ln 3) = -ln 3:   λ_U·(1 - σ(z₀ - r)) = 2·(1 - 3/4) = 0.5.
    Gradients (σ' = σ(1-σ) = 3/16): desirable -λ_D·β·3/16 = -0.1875; undesirable +λ_U·β·3/16 = 0.375.
    Rewards β·r = [ln 3, -ln 3]; reference point 0.
    """
    policy = _logps(-2 + LN3, -5.0).requires_grad_()
    out = kto_loss(
        policy,
        _logps(-2.0, -5 + LN3),
        torch.tensor([True, False]),
        torch.tensor(-0.3),
        beta=1.0,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert isinstance(out, KTOOutput)
    torch.testing.assert_close(out.losses, _logps(0.25, 0.5))
    torch.testing.assert_close(out.rewards, _logps(LN3, -LN3))
    assert out.reference_point.shape == () and out.reference_point.item() == 0.0
    out.losses.sum().backward()
    torch.testing.assert_close(policy.grad, _logps(-0.1875, 0.375))


def test_kto_positive_reference_point_hand_worked():
    """Policy at the reference (r = 0), kl_estimate 0.5 so z₀ = 0.5, β = 2·ln 3 so β·z₀ = ln 3.

    desirable:   1 - σ(β·(0 - 0.5)) = 1 - σ(-ln 3) = 1 - 1/4 = 0.75
    undesirable: 1 - σ(β·(0.5 - 0)) = 1 - σ(ln 3)  = 1 - 3/4 = 0.25
    With z₀ = 0 both would be 1 - σ(0) = 0.5: the reference point asks more of a desirable row and
    less of an undesirable one. The rewards leave z₀ out: β·0 = 0.
    """
    logps = _logps(-3.0, -3.0)
    out = kto_loss(logps, logps.clone(), torch.tensor([True, False]), 0.5, beta=2 * LN3)
    torch.testing.assert_close(out.losses, _logps(0.75, 0.25))
    torch.testing.assert_close(out.rewards, _logps(0.0, 0.0))
    assert out.reference_point.item() == pytest.approx(0.5)
    at_zero = kto_loss(logps, logps.clone(), torch.tensor([True, False]), 0.0, beta=2 * LN3)
    torch.testing.assert_close(at_zero.losses, _logps(0.5, 0.5))


def test_kto_batch_of_only_desirable_rows_hand_worked():
    """No undesirable row in the batch: every row takes the desirable branch, z₀ still applies.

    KL rows: policy [-3, -5] against reference [-3.2, -5.2], estimate mean(0.2, 0.2) = 0.2 = z₀.
    β = 0.5. r = [0.2, 0.2 + 2·ln 3]: [1 - σ(0.5·0), 1 - σ(0.5·2·ln 3)] = [1 - 1/2, 1 - 3/4] = [0.5, 0.25].
    undesirable_weight (7) weighs nothing.
    """
    kl_estimate = kto_kl_estimate(_logps(-3.0, -5.0), _logps(-3.2, -5.2))
    torch.testing.assert_close(kl_estimate, torch.tensor(0.2))
    out = kto_loss(
        _logps(-0.8, -0.8 + 2 * LN3),
        _logps(-1.0, -1.0),
        torch.tensor([True, True]),
        kl_estimate,
        beta=0.5,
        undesirable_weight=7.0,
    )
    torch.testing.assert_close(out.losses, _logps(0.5, 0.25))


def test_kto_kl_estimate_hand_worked_and_detached():
    """policy [-3, -5, -2] against reference [-4, -5, -2.5]: mean(1, 0, 0.5) = 0.5, a 0-dim detached tensor."""
    policy_kl = _logps(-3.0, -5.0, -2.0).requires_grad_()
    estimate = kto_kl_estimate(policy_kl, _logps(-4.0, -5.0, -2.5))
    assert estimate.shape == () and not estimate.requires_grad
    assert estimate.item() == pytest.approx(0.5)


def test_kto_reference_point_passes_no_gradient():
    """A kl_estimate that requires grad (say, computed without no_grad) gets none back; the policy does."""
    kl_estimate = torch.tensor(0.3, requires_grad=True)
    policy = _logps(-1.0, -2.0).requires_grad_()
    out = kto_loss(policy, _logps(-1.5, -1.5), torch.tensor([True, False]), kl_estimate, beta=0.1)
    assert not out.reference_point.requires_grad and not out.rewards.requires_grad
    out.losses.sum().backward()
    assert kl_estimate.grad is None
    assert policy.grad[0] < 0 < policy.grad[1]


def test_mismatched_completion_index_rotates_by_one():
    """TRL's [y_n, y_1, ..., y_{n-1}]: prompt i takes completion i - 1, prompt 0 the last one."""
    assert mismatched_completion_index(3).tolist() == [2, 0, 1]
    assert mismatched_completion_index(2).tolist() == [1, 0]
    for batch_size in (0, 1):
        with pytest.raises(ValueError, match="batch_size"):
            mismatched_completion_index(batch_size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": 0.1, "desirable_weight": -1.0}, "desirable_weight"),
        ({"beta": 0.1, "undesirable_weight": float("inf")}, "undesirable_weight"),
        ({"beta": 0.1, "desirable": torch.tensor([1.0, 0.0])}, "desirable"),
        ({"beta": 0.1, "desirable": torch.tensor([True])}, "desirable"),
        ({"beta": 0.1, "kl_estimate": torch.tensor([0.1, 0.2])}, "kl_estimate"),
    ],
)
def test_kto_rejects_bad_arguments(kwargs, message):
    arguments = {"desirable": torch.tensor([True, False]), "kl_estimate": 0.0, **kwargs}
    logps = _logps(-1.0, -2.0)
    with pytest.raises(ValueError, match=message):
        kto_loss(logps, logps, **arguments)


def test_kto_kl_estimate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="policy_kl_logps"):
        kto_kl_estimate(_logps(-1.0, -2.0), _logps(-1.0))


# --- ORPO: hand-worked and edge cases ---------------------------------------------------------


def test_orpo_hand_worked():
    """λ = β = 0.5. Probabilities are per token (length-averaged log-probs): odds = P / (1 - P).

    Pair 1: chosen 2 tokens, log π = -2·ln 2 → mean -ln 2, P = 1/2, odds 1, log odds 0;
            rejected 3 tokens, log π = -3·ln 4 → mean -ln 4, P = 1/4, odds 1/3, log odds -ln 3.
            log OR = 0 - (-ln 3) = ln 3; L_OR = -ln σ(ln 3) = ln(4/3) = 0.287682; NLL = ln 2.
            loss = ln 2 + 0.5·ln(4/3) = 0.693147 + 0.143841 = 0.836988.
    Pair 2: chosen 1 token at P = 1/4 (log π = -ln 4), rejected 1 token at P = 1/2 (log π = -ln 2).
            log OR = -ln 3 - 0 = -ln 3; L_OR = -ln σ(-ln 3) = ln 4; NLL = ln 4;
            loss = ln 4 + 0.5·ln 4 = 1.5·ln 4 = 2.079442.
    Gradients, with d(log odds)/d(mean log π) = 1 / (1 - P) and dL_OR/d(log OR) = -σ(-log OR):
      chosen:   (-1 - λ·σ(-log OR)/(1 - P_c)) / |y_c| → (-1 - 0.5·(1/4)·2) / 2 = -0.625;
                                                        (-1 - 0.5·(3/4)·(4/3)) / 1 = -1.5
      rejected: (λ·σ(-log OR)/(1 - P_r)) / |y_r|      → 0.5·(1/4)·(4/3) / 3 = 1/18 = 0.055556;
                                                        0.5·(3/4)·2 / 1 = 0.75
    Rewards β·mean log π: chosen [-0.5·ln 2, -0.5·ln 4], rejected [-0.5·ln 4, -0.5·ln 2].
    """
    chosen = _logps(-2 * LN2, -LN4).requires_grad_()
    rejected = _logps(-3 * LN4, -LN2).requires_grad_()
    out = orpo_loss(chosen, rejected, torch.tensor([2, 1]), torch.tensor([3, 1]), beta=0.5)
    assert isinstance(out, ORPOOutput)
    torch.testing.assert_close(out.losses, _logps(0.836988, 2.079442))
    torch.testing.assert_close(out.nll, _logps(LN2, LN4))
    torch.testing.assert_close(out.odds_ratio_loss, _logps(math.log(4 / 3), LN4))
    torch.testing.assert_close(out.log_odds_ratio, _logps(LN3, -LN3))
    torch.testing.assert_close(out.log_odds_chosen, _logps(0.0, -LN3))
    torch.testing.assert_close(out.chosen_rewards, _logps(-0.5 * LN2, -0.5 * LN4))
    torch.testing.assert_close(out.rejected_rewards, _logps(-0.5 * LN4, -0.5 * LN2))
    assert not any(field.requires_grad for field in out[1:])
    out.losses.sum().backward()
    torch.testing.assert_close(chosen.grad, _logps(-0.625, -1.5))
    torch.testing.assert_close(rejected.grad, _logps(1 / 18, 0.75))


def _log1m_exp_reference(x: float) -> float:
    """ln(1 - e^x) in 60-digit decimal arithmetic."""
    with localcontext() as context:
        context.prec = 60
        return float((1 - Decimal(x).exp()).ln())


def test_log1m_exp_is_accurate_over_the_whole_range():
    """Against 60-digit arithmetic, from x = -1e-12 (1 - e^x cancels) to x = -100 (e^x vanishes
    against 1): float64 within 1e-14 relative, float32 within 1e-6 relative. The naive float32
    ``log(1 - exp(x))`` at x = -1e-7 is off by 0.18 (ln(1.19e-7) for ln(1e-7)).
    """
    points = [-1e-12, -1e-7, -1e-3, -0.5, -LN2, -0.7, -1.0, -5.0, -40.0, -100.0]
    x64 = torch.tensor(points, dtype=torch.float64)
    expected64 = torch.tensor([_log1m_exp_reference(x) for x in x64.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1m_exp(x64), expected64, rtol=1e-14, atol=0)

    x32 = torch.tensor(points[:-1], dtype=torch.float32)
    expected32 = torch.tensor([_log1m_exp_reference(x) for x in x32.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1m_exp(x32).double(), expected32, rtol=1e-6, atol=0)
    naive = torch.log(1 - torch.exp(x32[1:2]))
    assert abs(naive.item() - expected32[1].item()) > 0.1


def test_log1m_exp_gradient_is_finite_on_both_sides_of_the_split():
    """d/dx ln(1 - e^x) = -e^x / (1 - e^x) = 1 / (1 - e^{-x}); no NaN from the branch not taken."""
    x = torch.tensor([-1e-7, -0.5, -LN2, -1.0, -30.0], dtype=torch.float64, requires_grad=True)
    log1m_exp(x).sum().backward()
    expected = torch.tensor([1 / -math.expm1(-v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)


def _orpo_reference(chosen_mean: float, rejected_mean: float, beta: float) -> tuple[float, float, float]:
    """(loss, d loss / d chosen_mean, d loss / d rejected_mean) per token, in float64 from the formulas."""

    def log_odds(x):
        return x - math.log(-math.expm1(x))

    log_odds_ratio = log_odds(chosen_mean) - log_odds(rejected_mean)
    sigmoid_neg = 1 / (1 + math.exp(log_odds_ratio))
    loss = -chosen_mean + beta * math.log1p(math.exp(-log_odds_ratio))
    d_chosen = -1 - beta * sigmoid_neg / -math.expm1(chosen_mean)
    d_rejected = beta * sigmoid_neg / -math.expm1(rejected_mean)
    return loss, d_chosen, d_rejected


@pytest.mark.parametrize("chosen_mean", [-1e-9, -1e-6, -1e-3])
def test_orpo_near_certain_chosen_is_accurate_in_float32(chosen_mean):
    """A chosen response whose mean log-prob is near 0 (P near 1, odds near infinity): the float32 loss
    and gradient match float64 formulas within 1e-5 relative (β = 1, rejected mean -2, 1 token each)."""
    chosen = _logps(chosen_mean).requires_grad_()
    rejected = _logps(-2.0).requires_grad_()
    out = orpo_loss(chosen, rejected, torch.tensor([1]), torch.tensor([1]), beta=1.0)
    out.losses.sum().backward()
    loss, d_chosen, d_rejected = _orpo_reference(chosen.item(), rejected.item(), 1.0)
    assert out.losses.item() == pytest.approx(loss, rel=1e-5)
    assert chosen.grad.item() == pytest.approx(d_chosen, rel=1e-5)
    assert rejected.grad.item() == pytest.approx(d_rejected, rel=1e-5)


def test_orpo_at_log_prob_zero_is_finite_and_near_the_limit():
    """Mean log-prob exactly 0 (an empty response, or every token certain in float32): odds are infinite.

    The loss is taken at -tiny, the smallest normal float: finite, and its gradient is the limit as
    P_c → 1 of the exact one. With β = 1, one token each and the rejected mean at -2
    (odds_r = e^-2 / (1 - e^-2) = 0.156518): σ(-log OR) = 1 / (1 + OR) → odds_r / odds_c
    = odds_r·(1 - P_c) / P_c, so
      loss = -log P_c + ln(1 + 1/OR) → 0,
      d/d(chosen) = -1 - σ(-log OR) / (1 - P_c) → -1 - odds_r / P_c → -1.156518,
      d/d(rejected) = σ(-log OR) / (1 - P_r) → 0.
    An empty chosen response (0 tokens, mean 0) gives a finite loss too.
    """
    chosen = _logps(0.0).requires_grad_()
    rejected = _logps(-2.0).requires_grad_()
    out = orpo_loss(chosen, rejected, torch.tensor([1]), torch.tensor([1]), beta=1.0)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.log_odds_ratio).all()
    assert out.losses.item() == pytest.approx(0.0, abs=1e-6)
    out.losses.sum().backward()
    odds_rejected = math.exp(-2.0) / -math.expm1(-2.0)
    assert chosen.grad.item() == pytest.approx(-1 - odds_rejected, rel=1e-3)
    assert rejected.grad.item() == pytest.approx(0.0, abs=1e-6)

    empty = orpo_loss(_logps(0.0).requires_grad_(), _logps(-3.0), torch.tensor([0]), torch.tensor([2]), beta=0.1)
    assert torch.isfinite(empty.losses).all()


def test_orpo_upcasts_bfloat16_log_probs():
    """bf16 log-probs are averaged and turned into odds in float32, as TRL does."""
    out = orpo_loss(
        torch.tensor([-2 * LN2], dtype=torch.bfloat16),
        torch.tensor([-3 * LN4], dtype=torch.bfloat16),
        torch.tensor([2]),
        torch.tensor([3]),
        beta=0.5,
    )
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(0.836988, abs=5e-3)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("inf")])
def test_orpo_rejects_bad_beta(beta):
    logps = _logps(-1.0)
    with pytest.raises(ValueError, match="beta"):
        orpo_loss(logps, logps, torch.tensor([1]), torch.tensor([1]), beta=beta)


# --- SimPO: hand-worked -----------------------------------------------------------------------


def _simpo_pairs(label_smoothing: float = 0.0, requires_grad: bool = False):
    """β = 2, γ = 0.5.

    Pair 1: chosen -3 over 3 tokens → r_c = 2·(-1) = -2; rejected -5 over 4 → r_r = 2·(-1.25) = -2.5;
            m = -2 + 2.5 - 0.5 = 0.
    Pair 2: chosen -1 over 2 tokens → r_c = -1; rejected -3 over 1 → r_r = -6; m = -1 + 6 - 0.5 = 4.5.
    """
    chosen = _logps(-3.0, -1.0).requires_grad_(requires_grad)
    rejected = _logps(-5.0, -3.0).requires_grad_(requires_grad)
    out = simpo_loss(
        chosen,
        rejected,
        torch.tensor([3, 2]),
        torch.tensor([4, 1]),
        beta=2.0,
        gamma=0.5,
        label_smoothing=label_smoothing,
    )
    return out, chosen, rejected


def test_simpo_hand_worked():
    """m = 0 → -ln σ(0) = ln 2 = 0.693147; m = 4.5 → -ln σ(4.5) = ln(1 + e^-4.5) = 0.011048.

    Gradients: dL/dm = -σ(-m); dm/d(chosen sum) = β/|y_c|, dm/d(rejected sum) = -β/|y_r|.
      chosen:   -σ(0)·2/3 = -1/3;   -σ(-4.5)·2/2 = -0.010987
      rejected: +σ(0)·2/4 = 0.25;   +σ(-4.5)·2/1 = 0.021974
    Rewards β·mean log π: chosen [-2, -1], rejected [-2.5, -6].
    """
    out, chosen, rejected = _simpo_pairs(requires_grad=True)
    assert isinstance(out, SimPOOutput)
    torch.testing.assert_close(out.losses, _logps(LN2, 0.011048))
    torch.testing.assert_close(out.chosen_rewards, _logps(-2.0, -1.0))
    torch.testing.assert_close(out.rejected_rewards, _logps(-2.5, -6.0))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    sigmoid_neg = 1 / (1 + math.exp(4.5))
    torch.testing.assert_close(chosen.grad, _logps(-1 / 3, -sigmoid_neg))
    torch.testing.assert_close(rejected.grad, _logps(0.25, 2 * sigmoid_neg))


def test_simpo_label_smoothing_hand_worked():
    """ε = 0.1: -(1-ε)·ln σ(m) - ε·ln σ(-m) = -ln σ(m) + ε·m, since ln σ(m) - ln σ(-m) = m.

    m = 0 → ln 2; m = 4.5 → 0.011048 + 0.1·4.5 = 0.461048.
    """
    out, _, _ = _simpo_pairs(label_smoothing=0.1)
    torch.testing.assert_close(out.losses, _logps(LN2, 0.461048))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0, "gamma": 0.5}, "beta"),
        ({"beta": 2.0, "gamma": -0.1}, "gamma"),
        ({"beta": 2.0, "gamma": float("nan")}, "gamma"),
        ({"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.6}, "label_smoothing"),
        ({"beta": 2.0, "gamma": 0.5, "label_smoothing": -0.1}, "label_smoothing"),
    ],
)
def test_simpo_rejects_bad_arguments(kwargs, message):
    logps = _logps(-1.0)
    with pytest.raises(ValueError, match=message):
        simpo_loss(logps, logps, torch.tensor([1]), torch.tensor([1]), **kwargs)


# --- Parity with TRL 1.16 ---------------------------------------------------------------------


def _random_logps(generator: torch.Generator, lengths: torch.Tensor) -> torch.Tensor:
    """float64 summed log-probs of ``lengths``-token responses, each token's log-prob in (-2, 0)."""
    return -2 * torch.rand(lengths.shape[0], generator=generator, dtype=torch.float64) * lengths


def _pairs(seed: int) -> dict:
    """BATCH random pairs, responses 1..40 tokens; the policy log-probs are leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 41, (BATCH,), generator=generator)
    rejected_lengths = torch.randint(1, 41, (BATCH,), generator=generator)
    return {
        "chosen": _random_logps(generator, chosen_lengths).requires_grad_(),
        "rejected": _random_logps(generator, rejected_lengths).requires_grad_(),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


class _Accelerator:
    """What TRL's loss code reads from ``accelerate.Accelerator`` on one CPU process.

    With ``other_rank_kl`` set, the first ``gather_for_metrics`` (KTO's gather of its batch KL
    estimate) returns this rank's value and a second rank's, as two data-parallel ranks would.
    """

    device = torch.device("cpu")

    def __init__(self, other_rank_kl: float | None = None):
        self.other_rank_kl = other_rank_kl

    def gather_for_metrics(self, tensor):
        if self.other_rank_kl is None:
            return tensor
        other, self.other_rank_kl = self.other_rank_kl, None
        return torch.stack([tensor.reshape(()), torch.tensor(other, dtype=tensor.dtype)])


def _token_table(logps: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(completion_mask, shifted per-token log-probs) for one prompt token then ``lengths[i]`` completion
    tokens of log-prob ``logps[i] / lengths[i]`` each; 0 outside the completion, as TRL's fused LM head
    gives for ignored labels. The per-token values stay differentiable in ``logps``."""
    width = int(lengths.max()) + 1
    positions = torch.arange(width)
    completion_mask = (positions >= 1) & (positions <= lengths[:, None])
    token_logps = torch.where(completion_mask[:, 1:], (logps / lengths)[:, None], torch.zeros((), dtype=logps.dtype))
    return completion_mask, token_logps


class _KTOPolicy(torch.nn.Module):
    """Stands in for the policy in TRL's KTOTrainer: matched rows have input_ids 0, KL rows 1."""

    def __init__(self, matched: torch.Tensor, kl: torch.Tensor):
        super().__init__()
        self.matched, self.kl = matched, kl

    def forward(self, input_ids, **_):
        token_logps = self.kl if int(input_ids[0, 0]) == 1 else self.matched
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, aux_loss=None)


def _kto_rows(seed: int, desirable_share: float, kl_shift: float) -> dict:
    """BATCH unpaired rows; KL rows are the completions rotated by one, with policy - reference log-probs
    around ``kl_shift`` per row."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (BATCH,), generator=generator)
    kl_lengths = lengths[mismatched_completion_index(BATCH)]
    reference_kl = _random_logps(generator, kl_lengths)
    return {
        "policy": _random_logps(generator, lengths).requires_grad_(),
        "reference": _random_logps(generator, lengths),
        "desirable": torch.rand(BATCH, generator=generator) < desirable_share,
        "lengths": lengths,
        "policy_kl": reference_kl + kl_shift + torch.randn(BATCH, generator=generator, dtype=torch.float64),
        "reference_kl": reference_kl,
        "kl_lengths": kl_lengths,
    }


def trl_kto_loss(rows: dict, beta: float, weights: tuple[float, float], other_rank_kl: float | None = None):
    """TRL's ``KTOTrainer._compute_loss`` (the batch mean) on ``rows``, reference log-probs precomputed."""
    from trl import KTOTrainer

    trainer = KTOTrainer.__new__(KTOTrainer)
    trainer.beta = beta
    trainer.desirable_weight, trainer.undesirable_weight = weights
    trainer.loss_type = "kto"
    trainer.calculate_KL = True
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.model = SimpleNamespace(training=False)
    trainer.accelerator = _Accelerator(other_rank_kl)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0

    completion_mask, matched = _token_table(rows["policy"], rows["lengths"])
    kl_completion_mask, kl = _token_table(rows["policy_kl"], rows["kl_lengths"])
    inputs = {
        "input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "KL_input_ids": torch.ones(kl_completion_mask.shape, dtype=torch.long),
        "KL_attention_mask": torch.ones(kl_completion_mask.shape, dtype=torch.long),
        "KL_completion_mask": kl_completion_mask.long(),
        "label": rows["desirable"],
        "ref_logps": rows["reference"],
        "ref_KL_logps": rows["reference_kl"],
    }
    return trainer._compute_loss(_KTOPolicy(matched, kl), inputs, return_outputs=False)


def _align_kto_loss(rows: dict, beta: float, weights: tuple[float, float], kl_estimate) -> KTOOutput:
    return kto_loss(
        rows["policy"],
        rows["reference"],
        rows["desirable"],
        kl_estimate,
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )


def _assert_same_loss_and_gradients(align_loss, trl_loss, leaves):
    """Loss values and gradients w.r.t. ``leaves`` within TRL_TOLERANCE."""
    assert _max_abs_diff(align_loss, trl_loss) < TRL_TOLERANCE
    align_grads = torch.autograd.grad(align_loss, leaves)
    trl_grads = torch.autograd.grad(trl_loss, leaves)
    for ours, theirs in zip(align_grads, trl_grads):
        assert torch.isfinite(ours).all()
        assert _max_abs_diff(ours, theirs) < TRL_TOLERANCE


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("desirable_share", "kl_shift", "weights"),
    [(0.5, 0.3, (1.0, 1.0)), (0.7, -0.3, (1.0, 1.33)), (1.0, 0.5, (1.5, 1.0))],
    ids=["mixed-positive-kl", "mixed-clamped-kl", "only-desirable"],
)
def test_kto_matches_trl(beta, desirable_share, kl_shift, weights):
    """Batch mean and gradients w.r.t. the policy log-probs, z₀ from the rotated KL rows.

    The cases cover a positive KL estimate, a negative one (z₀ clamped to 0) and a batch with only
    desirable rows (TRL concatenates an empty undesirable part).
    """
    rows = _kto_rows(seed=11, desirable_share=desirable_share, kl_shift=kl_shift)
    if desirable_share == 1.0:
        assert rows["desirable"].all()
    kl_estimate = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    assert (kl_estimate.item() > 0) == (kl_shift > 0)
    ours = _align_kto_loss(rows, beta, weights, kl_estimate)
    _assert_same_loss_and_gradients(ours.losses.mean(), trl_kto_loss(rows, beta, weights), [rows["policy"]])


def test_kto_reference_point_is_clamped_after_the_rank_average_as_in_trl():
    """Two ranks with KL estimates +0.3 (this one) and -0.5: TRL averages the ranks' means, -0.1, then
    clamps, z₀ = 0; clamping each rank first would give (0.3 + 0) / 2 = 0.15. kto_loss with the
    averaged estimate matches TRL; with 0.15 it does not (80% of the rows desirable, so that the
    opposite shifts of desirable and undesirable rows do not cancel in the mean).
    """
    rows = _kto_rows(seed=12, desirable_share=0.8, kl_shift=0.0)
    local = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    rows["policy_kl"] = rows["policy_kl"] + (0.3 - local.item())
    local = kto_kl_estimate(rows["policy_kl"], rows["reference_kl"])
    assert local.item() == pytest.approx(0.3)

    trl = trl_kto_loss(rows, 0.5, (1.0, 1.0), other_rank_kl=-0.5)
    averaged = _align_kto_loss(rows, 0.5, (1.0, 1.0), (local + -0.5) / 2)
    assert averaged.reference_point.item() == 0.0
    _assert_same_loss_and_gradients(averaged.losses.mean(), trl, [rows["policy"]])
    clamped_first = _align_kto_loss(rows, 0.5, (1.0, 1.0), 0.15).losses.mean()
    assert abs(clamped_first.item() - trl.item()) > 1e-3


def _trl_orpo(beta: float):
    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    trainer.beta = beta
    trainer.aux_loss_enabled = False
    trainer.accelerator = _Accelerator()
    return trainer


def _means(pairs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return pairs["chosen"] / pairs["chosen_lengths"], pairs["rejected"] / pairs["rejected_lengths"]


def _stub_forward(chosen_means, rejected_means, nll):
    """``concatenated_forward``'s outputs without a model: mean log-probs, zero logits, the NLL term."""
    logits = torch.zeros(chosen_means.shape[0], 1, 1, dtype=chosen_means.dtype)
    return lambda model, batch: (chosen_means, rejected_means, logits, logits, nll)


@pytest.mark.parametrize("beta", BETAS)
def test_orpo_odds_ratio_term_and_metrics_match_trl(beta):
    """Per pair, TRL's ``odds_ratio_loss`` returns β·log σ(log OR) = -β·odds_ratio_loss, and β·mean
    log-probs as rewards. Its metric named ``log_odds_chosen`` is the batch mean of our
    ``log_odds_ratio`` (the log odds ratio), and its ``log_odds_ratio`` is the mean of log σ(log OR).
    """
    pairs = _pairs(seed=21)
    ours = orpo_loss(pairs["chosen"], pairs["rejected"], pairs["chosen_lengths"], pairs["rejected_lengths"], beta=beta)
    trl_losses, trl_chosen, trl_rejected, trl_log_sigmoid_mean, trl_log_odds_mean = _trl_orpo(beta).odds_ratio_loss(
        *_means(pairs)
    )
    chosen_means, _ = _means(pairs)
    assert _max_abs_diff(ours.losses - ours.nll, -trl_losses) < TRL_TOLERANCE
    _assert_same_loss_and_gradients(
        ours.losses.sum(), (-chosen_means - trl_losses).sum(), [pairs["chosen"], pairs["rejected"]]
    )
    assert _max_abs_diff(ours.chosen_rewards, trl_chosen) < TRL_TOLERANCE
    assert _max_abs_diff(ours.rejected_rewards, trl_rejected) < TRL_TOLERANCE
    assert ours.log_odds_ratio.mean().item() == pytest.approx(trl_log_odds_mean.item(), abs=TRL_TOLERANCE)
    assert (-ours.odds_ratio_loss).mean().item() == pytest.approx(trl_log_sigmoid_mean.item(), abs=TRL_TOLERANCE)


@pytest.mark.parametrize("beta", BETAS)
def test_orpo_total_loss_matches_trl_given_the_same_nll(beta):
    """TRL's ``get_batch_loss_metrics``: ``nll - mean(β·log σ(log OR))``. Given our NLL term (the mean
    of per-pair NLLs) for its ``policy_nll_loss``, its loss equals the mean of ``orpo_loss(...).losses``,
    in value and gradient. (TRL's own NLL averages over all chosen tokens, prompts included.)
    """
    pairs = _pairs(seed=22)
    ours = orpo_loss(pairs["chosen"], pairs["rejected"], pairs["chosen_lengths"], pairs["rejected_lengths"], beta=beta)
    chosen_means, rejected_means = _means(pairs)
    trainer = _trl_orpo(beta)
    trainer.concatenated_forward = _stub_forward(chosen_means, rejected_means, (-chosen_means).mean())
    trl_loss, metrics = trainer.get_batch_loss_metrics(model=None, batch={})
    _assert_same_loss_and_gradients(ours.losses.mean(), trl_loss, [pairs["chosen"], pairs["rejected"]])
    assert metrics["rewards/accuracies"] == pytest.approx(
        (ours.chosen_rewards > ours.rejected_rewards).double().mean().item()
    )


def test_orpo_finite_where_trl_gradient_is_nan():
    """A chosen mean log-prob of -1e-8 in float32 (P rounds to 1): TRL's log1mexp evaluates its other
    branch there too, ``log1p(-exp(x)) = log1p(-1) = -inf``, and ``torch.where`` turns its gradient into
    NaN. Ours stays finite and matches the float64 formula."""
    chosen = _logps(-1e-8).requires_grad_()
    rejected = _logps(-2.0)
    trl_losses = _trl_orpo(0.5).odds_ratio_loss(chosen, rejected)[0]
    (trl_grad,) = torch.autograd.grad(trl_losses.sum(), chosen)
    assert torch.isnan(trl_grad).all()

    out = orpo_loss(chosen, rejected, torch.tensor([1]), torch.tensor([1]), beta=0.5)
    (grad,) = torch.autograd.grad(out.losses.sum(), chosen)
    _, d_chosen, _ = _orpo_reference(chosen.item(), rejected.item(), 0.5)
    assert grad.item() == pytest.approx(d_chosen, rel=1e-5)


def _trl_simpo(beta: float, gamma: float, label_smoothing: float):
    from trl.experimental.cpo import CPOTrainer

    trainer = CPOTrainer.__new__(CPOTrainer)
    trainer.beta = beta
    trainer.simpo_gamma = gamma
    trainer.label_smoothing = label_smoothing
    trainer.loss_type = "simpo"
    trainer.alpha = 0.0
    trainer.cpo_alpha = 0.0
    trainer.aux_loss_enabled = False
    trainer.accelerator = _Accelerator()
    return trainer


@pytest.mark.parametrize("beta", [0.1, 2.0, 10.0])
@pytest.mark.parametrize(("gamma", "label_smoothing"), [(0.5, 0.0), (1.6, 0.0), (0.5, 0.2)])
def test_simpo_matches_trl(beta, gamma, label_smoothing):
    """Per pair against ``cpo_loss``, and the batch loss with ``cpo_alpha=0`` (plain SimPO) against
    ``get_batch_loss_metrics``, on mean log-probs; values and gradients."""
    pairs = _pairs(seed=31)
    ours = simpo_loss(
        pairs["chosen"],
        pairs["rejected"],
        pairs["chosen_lengths"],
        pairs["rejected_lengths"],
        beta=beta,
        gamma=gamma,
        label_smoothing=label_smoothing,
    )
    trainer = _trl_simpo(beta, gamma, label_smoothing)
    chosen_means, rejected_means = _means(pairs)
    trl_losses, trl_chosen, trl_rejected = trainer.cpo_loss(chosen_means, rejected_means)
    assert _max_abs_diff(ours.losses, trl_losses) < TRL_TOLERANCE
    assert _max_abs_diff(ours.chosen_rewards, trl_chosen) < TRL_TOLERANCE
    assert _max_abs_diff(ours.rejected_rewards, trl_rejected) < TRL_TOLERANCE

    trainer.concatenated_forward = _stub_forward(chosen_means, rejected_means, torch.tensor(0.0))
    trl_loss, _ = trainer.get_batch_loss_metrics(model=None, batch={})
    _assert_same_loss_and_gradients(ours.losses.mean(), trl_loss, [pairs["chosen"], pairs["rejected"]])
