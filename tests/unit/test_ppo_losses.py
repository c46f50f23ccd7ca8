"""Tests for align.losses.ppo: PPO policy and value losses, entropy, GRPO/RLOO loss."""

import math

import pytest
import torch

from align.losses import (
    GRPOLossOutput,
    PolicyLossOutput,
    entropy_from_logits,
    grpo_loss,
    policy_loss,
    value_loss,
)
from align.ops import accumulation_scale, global_count

LN2 = math.log(2.0)
LN3 = math.log(3.0)


# --- policy loss ----------------------------------------------------------------------------


def _clip_case():
    """Ratios 1.3 and 0.7 (old log-probs 0), advantages +2 and -2, ε = 0.2."""
    logps = torch.tensor([[math.log(1.3), math.log(1.3)], [math.log(0.7), math.log(0.7)]], requires_grad=True)
    old_logps = torch.zeros(2, 2)
    advantages = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    return logps, old_logps, advantages


def test_policy_loss_clip_hand_worked():
    """Per token max(-A·ρ, -A·clip(ρ, 0.8, 1.2)), i.e. -min(ρA, clip(ρ)A):

    ρ 1.3, A +2: max(-2.6, -2.4) = -2.4, clip binds (no gain past 1.2), grad 0
    ρ 1.3, A -2: max( 2.6,  2.4) =  2.6, unclipped, grad d(-Aρ)/dlogp = -Aρ = 2.6
    ρ 0.7, A +2: max(-1.4, -1.6) = -1.4, unclipped, grad -Aρ = -1.4
    ρ 0.7, A -2: max( 1.4,  1.6) =  1.6, clip binds, grad 0
    loss_sum = -2.4 + 2.6 - 1.4 + 1.6 = 0.4; 4 tokens, 2 clipped; ratio_sum = 1.3·2 + 0.7·2 = 4.0.
    approx KL k3 = (ρ - 1) - ln ρ: 0.3 - 0.262364 = 0.037636 and -0.3 + 0.356675 = 0.056675,
    summed twice each: 0.188622.
    """
    logps, old_logps, advantages = _clip_case()
    out = policy_loss(logps, old_logps, advantages, torch.ones(2, 2), clip_eps=0.2)
    assert isinstance(out, PolicyLossOutput)
    torch.testing.assert_close(out.loss_sum, torch.tensor(0.4))
    assert out.token_count.item() == 4 and out.token_count.dtype == torch.int64
    assert out.clipped_tokens.item() == 2
    torch.testing.assert_close(out.ratio_sum, torch.tensor(4.0))
    torch.testing.assert_close(out.approx_kl_sum, torch.tensor(0.188622))
    out.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 2.6], [-1.4, 0.0]]))
    assert not any(t.requires_grad for t in out[1:])


def test_policy_loss_at_old_policy_is_policy_gradient():
    """π = π_old: ρ = 1, nothing clipped, approx KL 0, loss_sum = -sum A = -(1.5 - 0.5 + 2) = -3,
    and d loss / d logp = -A: descent raises the log-prob of positive-advantage tokens."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    advantages = torch.tensor([[1.5, -0.5], [2.0, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    out = policy_loss(logps, logps.detach().clone(), advantages, mask, clip_eps=0.2)
    torch.testing.assert_close(out.loss_sum, torch.tensor(-3.0))
    assert out.token_count.item() == 3
    assert out.clipped_tokens.item() == 0
    assert out.approx_kl_sum.item() == 0.0
    torch.testing.assert_close(out.ratio_sum, torch.tensor(3.0))
    out.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.5, 0.5], [-2.0, 0.0]]))


def test_policy_loss_ignores_non_finite_padding():
    """NaN and -inf at padded positions change neither the loss nor the gradient (no NaN grads)."""
    logps = torch.tensor([[-1.0, -math.inf]], requires_grad=True)
    old_logps = torch.tensor([[-1.0, math.nan]])
    out = policy_loss(logps, old_logps, torch.tensor([[2.0, math.nan]]), torch.tensor([[1, 0]]), 0.2)
    torch.testing.assert_close(out.loss_sum, torch.tensor(-2.0))
    assert math.isfinite(out.approx_kl_sum.item()) and math.isfinite(out.ratio_sum.item())
    out.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-2.0, 0.0]]))


def _reference_policy_loss(logps, old_logps, advantages, lengths, clip_eps):
    """Eq. 7 of Schulman et al. 2017 written with Python floats: sum of -min(ρA, clip(ρ)A)."""
    total = 0.0
    for row_logps, row_old, row_advantages, length in zip(logps, old_logps, advantages, lengths):
        for t in range(length):
            ratio = math.exp(row_logps[t] - row_old[t])
            clipped_ratio = min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            total += -min(ratio * row_advantages[t], clipped_ratio * row_advantages[t])
    return total


def test_policy_loss_matches_independent_implementation():
    generator = torch.Generator().manual_seed(0)
    old_logps = -3 * torch.rand(4, 6, generator=generator, dtype=torch.float64)
    logps = old_logps + 0.4 * torch.randn(4, 6, generator=generator, dtype=torch.float64)
    advantages = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    lengths = [6, 3, 1, 5]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    out = policy_loss(logps, old_logps, advantages, mask, clip_eps=0.2)
    expected = _reference_policy_loss(logps.tolist(), old_logps.tolist(), advantages.tolist(), lengths, 0.2)
    assert out.loss_sum.item() == pytest.approx(expected, rel=1e-12)
    assert out.token_count.item() == sum(lengths)


def test_policy_loss_token_weighted_across_micro_batches():
    """Two micro-batches of 1 row (5 and 1 tokens) scaled by accumulation_scale sum to the
    token mean of the whole batch: every one of the 6 tokens weighs 1/6."""
    generator = torch.Generator().manual_seed(1)
    logps = torch.randn(2, 5, generator=generator)
    old_logps = logps + 0.1 * torch.randn(2, 5, generator=generator)
    advantages = torch.randn(2, 5, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    whole = policy_loss(logps, old_logps, advantages, mask, 0.2)
    scale = accumulation_scale(global_count(mask.sum()), gradient_accumulation_steps=2, world_size=1)
    split = sum(
        policy_loss(
            logps[i : i + 1], old_logps[i : i + 1], advantages[i : i + 1], mask[i : i + 1], 0.2
        ).loss_sum
        * scale
        / 2  # the engine's division by gradient_accumulation_steps
        for i in range(2)
    )
    torch.testing.assert_close(split, whole.loss_sum / whole.token_count)


# --- value loss -----------------------------------------------------------------------------


def test_value_loss_hand_worked():
    """V_old = 1, ε = 0.2, V_clip = 1 + clip(V - 1, -0.2, 0.2); per token ½ max((V-R)², (V_clip-R)²).

    V 1.5, R 2: ½ max(0.25, (1.2-2)² = 0.64) = 0.32, clip binds, grad 0
    V 0.5, R 0: ½ max(0.25, (0.8-0)² = 0.64) = 0.32, clip binds, grad 0
    V 1.1, R 2: within ε, ½ · 0.81 = 0.405, grad V - R = -0.9
    V 1.5, R 1: ½ max(0.25, 0.04) = 0.125, unclipped wins, grad 0.5
    padded (V 9, R -9): ignored. Sum 0.32 + 0.32 + 0.405 + 0.125 = 1.17; 2 tokens clipped.
    """
    values = torch.tensor([[1.5, 0.5, 1.1, 1.5, 9.0]], requires_grad=True)
    old_values = torch.ones(1, 5)
    returns = torch.tensor([[2.0, 0.0, 2.0, 1.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(out.loss_sum, torch.tensor(1.17))
    assert out.token_count.item() == 4 and out.clipped_tokens.item() == 2
    out.loss_sum.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0, -0.9, 0.5, 0.0]]))


def test_value_loss_at_old_values_is_half_squared_error():
    """V = V_old: ½ ((1 - 3)² + (2 - 1)²) = ½ (4 + 1) = 2.5, gradient V - R = [-2, 1]."""
    values = torch.tensor([[1.0, 2.0]], requires_grad=True)
    out = value_loss(values, values.detach().clone(), torch.tensor([[3.0, 1.0]]), torch.ones(1, 2), 0.2)
    torch.testing.assert_close(out.loss_sum, torch.tensor(2.5))
    assert out.clipped_tokens.item() == 0
    out.loss_sum.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[-2.0, 1.0]]))


# --- entropy --------------------------------------------------------------------------------


def test_entropy_from_logits_hand_worked():
    """logits [0, ln 3] → p = [1/4, 3/4]: H = ¼ ln 4 + ¾ ln(4/3) = 0.346574 + 0.215762 = 0.562335.
    logits [0, 0] → H = ln 2 = 0.693147. Third position masked. Sum 1.255482 over 2 tokens."""
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [50.0, -50.0]]])
    entropy_sum, token_count = entropy_from_logits(logits, torch.tensor([[1, 1, 0]]))
    torch.testing.assert_close(entropy_sum, torch.tensor(0.562335 + LN2))
    assert token_count.item() == 2


def test_entropy_matches_categorical_with_grad():
    generator = torch.Generator().manual_seed(2)
    logits = (3 * torch.randn(2, 4, 7, generator=generator)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    entropy_sum, _ = entropy_from_logits(logits, mask)
    entropy_sum.backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected = (torch.distributions.Categorical(logits=logits).entropy() * mask).sum()
    expected.backward()
    torch.testing.assert_close(entropy_sum, expected)
    torch.testing.assert_close(ours, logits.grad)


def test_entropy_bf16_logits_computed_in_float32():
    """Uniform bf16 logits over 8 tokens: ln 8 = 2.079442 per token, returned in float32."""
    entropy_sum, _ = entropy_from_logits(torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.ones(1, 1))
    assert entropy_sum.dtype == torch.float32
    torch.testing.assert_close(entropy_sum, torch.tensor(math.log(8)))


# --- GRPO / RLOO loss -----------------------------------------------------------------------


def test_grpo_loss_hand_worked():
    """π = π_old (ρ = 1), β = 0.1, k3 KL to the reference, r = π_ref/π.

    Row 0, A = +1, 2 tokens: log r = [ln 2, 0] → k3 = [1 - ln 2, 0] = [0.306853, 0].
    Row 1, A = -0.5, 1 token + padding: log r = -ln 2 → k3 = 0.5 - 1 + ln 2 = 0.193147.
    Surrogate -A per token: -1 - 1 + 0.5 = -1.5. KL sum 0.306853 + 0.193147 = 0.5 exactly.
    loss_sum = -1.5 + 0.1 · 0.5 = -1.45.
    Gradient -A + β(1 - r): row 0: -1 + 0.1·(1 - 2) = -1.1, -1 + 0 = -1; row 1: 0.5 + 0.1·0.5 = 0.55.
    """
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -math.inf]], requires_grad=True)
    reference_logps = torch.tensor([[-1.0 + LN2, -2.0], [-3.0 - LN2, math.nan]])
    out = grpo_loss(
        logps,
        logps.detach().clone(),
        reference_logps,
        torch.tensor([1.0, -0.5]),
        torch.tensor([[1, 1], [1, 0]]),
        clip_eps=0.2,
        kl_coef=0.1,
    )
    assert isinstance(out, GRPOLossOutput)
    torch.testing.assert_close(out.loss_sum, torch.tensor(-1.45))
    torch.testing.assert_close(out.kl_sum, torch.tensor(0.5))
    assert out.token_count.item() == 3 and out.clipped_tokens.item() == 0
    torch.testing.assert_close(out.ratio_sum, torch.tensor(3.0))
    out.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-1.1, -1.0], [0.55, 0.0]]))


def test_grpo_loss_clips_with_sequence_advantage():
    """Ratio 1.3, ε 0.2, one sequence with A = +2 over 2 tokens, β = 0, reference = policy:
    each token max(-2.6, -2.4) = -2.4 (clipped), loss_sum -4.8, gradient 0; with A = -2 each token is
    2.6 (unclipped), loss_sum 5.2, gradient -Aρ = 2.6."""
    logps = torch.full((1, 2), math.log(1.3), requires_grad=True)
    old_logps, mask = torch.zeros(1, 2), torch.ones(1, 2)
    positive = grpo_loss(logps, old_logps, logps.detach(), torch.tensor([2.0]), mask, 0.2, kl_coef=0.0)
    torch.testing.assert_close(positive.loss_sum, torch.tensor(-4.8))
    assert positive.clipped_tokens.item() == 2
    positive.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.zeros(1, 2))
    logps.grad = None
    negative = grpo_loss(logps, old_logps, logps.detach(), torch.tensor([-2.0]), mask, 0.2, kl_coef=0.0)
    torch.testing.assert_close(negative.loss_sum, torch.tensor(5.2))
    negative.loss_sum.backward()
    torch.testing.assert_close(logps.grad, torch.full((1, 2), 2.6))


def test_grpo_loss_equals_policy_loss_plus_kl_term():
    """With the advantage broadcast over tokens by hand, grpo_loss = policy_loss + β · sum k (k1 here)."""
    generator = torch.Generator().manual_seed(3)
    old_logps = -2 * torch.rand(3, 4, generator=generator)
    logps = old_logps + 0.3 * torch.randn(3, 4, generator=generator)
    reference_logps = old_logps + 0.3 * torch.randn(3, 4, generator=generator)
    advantages = torch.randn(3, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    out = grpo_loss(logps, old_logps, reference_logps, advantages, mask, 0.2, 0.05, kl_estimator="k1")
    ppo = policy_loss(logps, old_logps, advantages[:, None].expand(3, 4), mask, 0.2)
    kl_sum = ((logps - reference_logps) * mask).sum()
    torch.testing.assert_close(out.loss_sum, ppo.loss_sum + 0.05 * kl_sum)
    torch.testing.assert_close(out.kl_sum, kl_sum)
    assert out.clipped_tokens.item() == ppo.clipped_tokens.item()


# --- argument checks ------------------------------------------------------------------------


def test_losses_reject_bad_arguments():
    tokens, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(tokens, tokens, tokens, mask, clip_eps=0.0)
    with pytest.raises(ValueError, match="one shape"):
        policy_loss(tokens, tokens, torch.zeros(2), mask, clip_eps=0.2)
    with pytest.raises(ValueError, match="clip_eps"):
        value_loss(tokens, tokens, tokens, mask, clip_eps=-1.0)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(tokens, tokens, tokens, tokens, mask, 0.2, 0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(tokens, tokens, tokens, torch.zeros(2), mask, 0.2, -0.1)
    with pytest.raises(ValueError, match="k5"):
        grpo_loss(tokens, tokens, tokens, torch.zeros(2), mask, 0.2, 0.1, kl_estimator="k5")
    with pytest.raises(ValueError, match="vocab"):
        entropy_from_logits(tokens, mask)
