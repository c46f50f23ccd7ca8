"""Tests for align.ops.advantages: GAE, KL estimators, token rewards, KL controllers, GRPO/RLOO."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from align.ops import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    rloo_advantages,
    token_rewards,
)

LN2 = math.log(2.0)


# --- GAE ------------------------------------------------------------------------------------


def test_gae_hand_worked():
    """γ = 0.9, λ = 0.8 (γλ = 0.72). Row 0: r = [1, 0, 2], V = [0.5, 1.0, 1.5], all real.

    t=2: δ = 2 + 0.9·0 - 1.5 = 0.5                    A = 0.5
    t=1: δ = 0 + 0.9·1.5 - 1.0 = 0.35                 A = 0.35 + 0.72·0.5 = 0.71
    t=0: δ = 1 + 0.9·1.0 - 0.5 = 1.4                  A = 1.4 + 0.72·0.71 = 1.9112
    returns = A + V = [2.4112, 1.71, 2.0].

    Row 1: r = [1, 2, 99], V = [0.5, 1.5, 77], mask [1, 1, 0]: the padded 99 and 77 are ignored.
    t=1: δ = 2 + 0 - 1.5 = 0.5                        A = 0.5
    t=0: δ = 1 + 0.9·1.5 - 0.5 = 1.85                 A = 1.85 + 0.72·0.5 = 2.21
    returns = [2.71, 2.0, 0].
    """
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.5, 77.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.9112, 0.71, 0.5], [2.21, 0.5, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.4112, 1.71, 2.0], [2.71, 2.0, 0.0]]))


def test_gae_lambda_one_and_zero():
    """γ = 1, λ = 1: A_t = (sum of rewards from t) - V_t (Monte Carlo): r = [1, 0, 2], V = [0.5, 1, 1.5]
    → [3 - 0.5, 2 - 1, 2 - 1.5] = [2.5, 1, 0.5]. λ = 0: A_t = δ_t = [1 + 1 - 0.5, 0 + 1.5 - 1, 2 - 1.5]
    = [1.5, 0.5, 0.5]."""
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    torch.testing.assert_close(gae(rewards, values, mask, 1.0, 1.0)[0], torch.tensor([[2.5, 1.0, 0.5]]))
    torch.testing.assert_close(gae(rewards, values, mask, 1.0, 0.0)[0], torch.tensor([[1.5, 0.5, 0.5]]))


def test_gae_ignores_nan_at_padding_and_detaches():
    """NaN rewards/values on padded positions do not leak; outputs carry no graph."""
    values = torch.tensor([[1.0, math.nan]], requires_grad=True)
    advantages, returns = gae(torch.tensor([[2.0, math.nan]]), values, torch.tensor([[1, 0]]), 0.9, 0.8)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.0, 0.0]]))
    assert not advantages.requires_grad and not returns.requires_grad


def _reference_gae(rewards, values, lengths, gamma, lam):
    """GAE written out with Python floats, one response at a time over its real tokens."""
    all_advantages, all_returns = [], []
    for row_rewards, row_values, length in zip(rewards, values, lengths):
        advantages = [0.0] * len(row_rewards)
        running = 0.0
        for t in range(length - 1, -1, -1):
            next_value = row_values[t + 1] if t + 1 < length else 0.0
            delta = row_rewards[t] + gamma * next_value - row_values[t]
            running = delta + gamma * lam * running
            advantages[t] = running
        returns = [a + v if t < length else 0.0 for t, (a, v) in enumerate(zip(advantages, row_values))]
        all_advantages.append(advantages)
        all_returns.append(returns)
    return all_advantages, all_returns


def test_gae_matches_independent_loop():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    values = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    lengths = [9, 1, 4, 0, 7]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values, mask, gamma=0.97, lam=0.95)
    expected_advantages, expected_returns = _reference_gae(
        rewards.tolist(), values.tolist(), lengths, 0.97, 0.95
    )
    assert advantages.dtype == torch.float64
    torch.testing.assert_close(advantages, torch.tensor(expected_advantages, dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor(expected_returns, dtype=torch.float64))


@pytest.mark.parametrize(("gamma", "lam"), [(1.1, 0.9), (0.9, -0.1)])
def test_gae_rejects_bad_arguments(gamma, lam):
    with pytest.raises(ValueError, match="gamma" if gamma > 1 else "lam"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), gamma, lam)


def test_whitening_gae_advantages_uses_only_real_tokens():
    """masked_whiten (align.ops, tested in test_ops) on row 1 of the hand-worked GAE: the padded 0
    is left out, so the 5 real advantages have mean 0 and unbiased variance 1."""
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.5, 77.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    whitened = masked_whiten(advantages, mask)
    torch.testing.assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_var(whitened, mask), torch.tensor(1.0))


# --- KL estimators --------------------------------------------------------------------------


def test_kl_estimators_hand_worked():
    """r = π_ref/π. logp = 0, ref = ln 2 → log r = ln 2 = 0.693147, r = 2:
    k1 = -ln 2 = -0.693147; k2 = ½ (ln 2)² = 0.240227; k3 = (2 - 1) - ln 2 = 0.306853.
    logp = ln 2, ref = 0 → log r = -ln 2, r = 1/2:
    k1 = 0.693147; k2 = 0.240227; k3 = (0.5 - 1) + ln 2 = 0.193147.
    """
    logps = torch.tensor([[0.0, LN2]])
    reference_logps = torch.tensor([[LN2, 0.0]])
    torch.testing.assert_close(kl_k1(logps, reference_logps), torch.tensor([[-LN2, LN2]]))
    torch.testing.assert_close(kl_k2(logps, reference_logps), torch.tensor([[0.240227, 0.240227]]))
    torch.testing.assert_close(kl_k3(logps, reference_logps), torch.tensor([[0.306853, 0.193147]]))
    torch.testing.assert_close(kl_estimate(logps, reference_logps, "k3"), kl_k3(logps, reference_logps))
    torch.testing.assert_close(kl_estimate(logps, reference_logps, "k1"), kl_k1(logps, reference_logps))


def test_kl_estimators_zero_at_equal_policies():
    logps = torch.tensor([[-0.1, -2.0, -7.5]])
    for estimator in (kl_k1, kl_k2, kl_k3):
        assert torch.equal(estimator(logps, logps.clone()), torch.zeros(1, 3))


def test_k1_and_k3_are_unbiased_under_exact_expectation():
    """π = [1/2, 1/4, 1/4], π_ref = [1/4, 1/4, 1/2]. KL(π‖π_ref) = ½ ln 2 + 0 + ¼ ln ½ = ¼ ln 2.

    E_π[k1] = KL exactly; E_π[k3] = E_π[r - 1] + KL = 0 + KL, since E_π[r] = sum π_ref = 1.
    k2 is biased: E_π[½ (log r)²] = ½ (½ (ln 2)² + ¼ (ln 2)²) = (3/8)(ln 2)² ≠ ¼ ln 2.
    """
    policy = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    reference = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    logps, reference_logps = policy.log()[None], reference.log()[None]
    expected = 0.25 * LN2
    assert (policy * kl_k1(logps, reference_logps)[0]).sum().item() == pytest.approx(expected)
    assert (policy * kl_k3(logps, reference_logps)[0]).sum().item() == pytest.approx(expected)
    assert (policy * kl_k2(logps, reference_logps)[0]).sum().item() == pytest.approx(3 / 8 * LN2**2)


_finite = st.floats(min_value=-30.0, max_value=30.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(logp=_finite, reference_logp=_finite)
def test_k3_is_non_negative(logp, reference_logp):
    """(r - 1) - log r ≥ 0 for every r > 0, in float32 too (expm1 avoids cancellation near r = 1)."""
    for dtype in (torch.float32, torch.float64):
        k3 = kl_k3(torch.tensor([logp], dtype=dtype), torch.tensor([reference_logp], dtype=dtype))
        assert k3.item() >= 0.0


def test_k3_is_non_negative_near_equal_policies():
    """Near r = 1 a plain ``exp(log r) - 1 - log r`` in float32 goes negative on about 10 % of a
    ±1e-3 grid (cancellation); k3 must not."""
    log_ratio = torch.linspace(-1e-3, 1e-3, 20001)
    assert (kl_k3(torch.zeros_like(log_ratio), log_ratio) >= 0).all()


def test_kl_gradient_signs():
    """d k3 / d logp = 1 - r. With r = 2 (policy below the reference) the gradient is -1, so descent
    raises log π towards the reference; with r = 1/2 it is +1/2. d k1 / d logp = 1 always."""
    logps = torch.tensor([[0.0, LN2]], requires_grad=True)
    reference_logps = torch.tensor([[LN2, 0.0]])
    kl_k3(logps, reference_logps).sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.0, 0.5]]))
    logps.grad = None
    kl_k1(logps, reference_logps).sum().backward()
    torch.testing.assert_close(logps.grad, torch.ones(1, 2))


def test_kl_estimate_rejects_unknown_name():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# --- token rewards --------------------------------------------------------------------------


def test_token_rewards_hand_worked():
    """β = 0.5, score [1, 2, 5], KL [[0.1, 0.2, 0.3], [0.4, 0.5, 9], [7, 7, 7]],
    mask [[1,1,1], [1,1,0], [0,0,0]].

    Row 0: [-0.05, -0.1, -0.15 + 1] = [-0.05, -0.1, 0.85]
    Row 1: [-0.2, -0.25 + 2, 0 (padding)] = [-0.2, 1.75, 0]
    Row 2: no tokens, so no score and no penalty: [0, 0, 0].
    """
    score = torch.tensor([1.0, 2.0, 5.0], requires_grad=True)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    rewards = token_rewards(score, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    assert not rewards.requires_grad


def test_token_rewards_sum_is_score_minus_kl():
    """Summed over a response, the reward is score - β · (summed KL): 3 - 0.1·(1 + 2 + 3) = 2.4."""
    rewards = token_rewards(torch.tensor([3.0]), torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3), 0.1)
    torch.testing.assert_close(rewards.sum(), torch.tensor(2.4))


# --- KL controllers -------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_worked():
    """β_0 = 0.2, target 6, horizon 10000, n_steps 256 (K_β = 0.0256).

    KL 12:  e = clip(12/6 - 1) = clip(1.0) = 0.2     β = 0.2 · (1 + 0.2·0.0256) = 0.2 · 1.00512 = 0.201024
    KL 6.6: e = 0.1                                  β = 0.201024 · 1.00256 = 0.2015386
    KL 3:   e = clip(-0.5) = -0.2                    β = 0.2015386 · 0.99488 = 0.2005067
    KL 6:   e = 0                                    β unchanged.
    """
    controller = AdaptiveKLController(init_coef=0.2, target=6.0, horizon=10000)
    assert controller.update(12.0, 256) == pytest.approx(0.201024)
    assert controller.update(6.6, 256) == pytest.approx(0.201024 * 1.00256)
    assert controller.update(3.0, 256) == pytest.approx(0.201024 * 1.00256 * 0.99488)
    before = controller.coef
    assert controller.update(6.0, 256) == pytest.approx(before)


def test_fixed_kl_controller_never_changes():
    controller = FixedKLController(0.05)
    assert controller.update(100.0, 256) == 0.05 and controller.coef == 0.05


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"init_coef": -1.0, "target": 6.0, "horizon": 10}, "init_coef"),
        ({"init_coef": 0.1, "target": 0.0, "horizon": 10}, "target"),
        ({"init_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_kl_controller_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLController(**kwargs)


# --- GRPO and RLOO --------------------------------------------------------------------------


def test_grpo_advantages_hand_worked():
    """Group [1, 2, 6]: mean 3, deviations [-2, -1, 3], unbiased variance (4 + 1 + 9)/2 = 7,
    std √7 = 2.645751. eps 0: [-2, -1, 3]/2.645751 = [-0.755929, -0.377964, 1.133893].
    eps 1: [-2, -1, 3]/3.645751 = [-0.548584, -0.274292, 0.822876]. scale=False: [-2, -1, 3].
    Group [4, 4, 4]: all 0 (std 0, eps keeps it finite).
    """
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    torch.testing.assert_close(
        grpo_advantages(rewards[:3], 3, eps=0.0), torch.tensor([-0.755929, -0.377964, 1.133893])
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, 3, eps=1.0), torch.tensor([-0.548584, -0.274292, 0.822876, 0, 0, 0])
    )
    torch.testing.assert_close(
        grpo_advantages(rewards, 3, scale=False), torch.tensor([-2.0, -1.0, 3.0, 0, 0, 0])
    )
    torch.testing.assert_close(grpo_advantages(rewards, 3)[3:], torch.zeros(3))


def test_rloo_advantages_hand_worked():
    """Group [1, 2, 6]: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5,
    which is 3/2 · [-2, -1, 3] = k/(k-1) · (r - mean). Group [0, 1]: [0 - 1, 1 - 0] = [-1, 1]."""
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3), torch.tensor([-3.0, -1.5, 4.5])
    )
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2), torch.tensor([-1.0, 1.0, 1.0, -1.0])
    )


def test_group_advantages_sum_to_zero_per_group():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(4 * 5, generator=generator, dtype=torch.float64)
    for advantages in (grpo_advantages(rewards, 5), rloo_advantages(rewards, 5)):
        torch.testing.assert_close(advantages.reshape(4, 5).sum(1), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("function", [grpo_advantages, rloo_advantages])
def test_group_advantages_reject_bad_groups(function):
    with pytest.raises(ValueError, match="groups of 4"):
        function(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        function(torch.zeros(6), 1)
    with pytest.raises(ValueError, match="1-D"):
        function(torch.zeros(2, 3), 3)
