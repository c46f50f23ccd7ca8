"""Tests for align.losses: SFT, Bradley–Terry reward and DPO-family losses."""

import math

import pytest
import torch

from align.losses import (
    DPOOutput,
    chosen_nll,
    dpo_loss,
    implicit_reward_accuracy,
    pairwise_accuracy,
    pairwise_reward_loss,
    sft_loss,
)

LN2 = math.log(2.0)
LN3 = math.log(3.0)


# --- SFT ------------------------------------------------------------------------------------


def test_sft_loss_hand_worked():
    """token_logps [[-1,-2,-3],[-4,-5,-6]], mask [[1,1,0],[1,0,0]].

    NLL sum = 1 + 2 + 4 = 7 over 3 tokens; d(sum)/d(logp) = -mask.
    """
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nll_sum, token_count = sft_loss(token_logps, mask)
    assert nll_sum.item() == 7.0
    assert token_count.item() == 3 and token_count.dtype == torch.int64
    assert not token_count.requires_grad
    nll_sum.backward()
    torch.testing.assert_close(token_logps.grad, -mask.float())


def test_sft_loss_ignores_inf_at_masked_positions():
    """A masked -inf log-prob (e.g. a padding label) contributes nothing: sum = 0.5, count 1."""
    nll_sum, token_count = sft_loss(torch.tensor([[-0.5, -math.inf]]), torch.tensor([[True, False]]))
    assert nll_sum.item() == 0.5 and token_count.item() == 1


# --- Bradley–Terry reward -------------------------------------------------------------------


def test_pairwise_reward_loss_hand_worked():
    """σ(ln 3) = 3/(3+1) = 3/4, σ(-ln 3) = 1/4.

    r_c - r_r = ln 3 → -ln(3/4) = ln(4/3) = 0.287682; r_c - r_r = -ln 3 → -ln(1/4) = ln 4;
    r_c = r_r → -ln(1/2) = ln 2.
    """
    chosen = torch.tensor([LN3, 0.0, 1.0])
    rejected = torch.tensor([0.0, LN3, 1.0])
    losses = pairwise_reward_loss(chosen, rejected)
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([math.log(4 / 3), math.log(4.0), LN2]))


def test_pairwise_reward_loss_with_margin_hand_worked():
    """Margin ln 3 on a difference of ln 3: -ln σ(0) = ln 2. Margin 0 changes nothing: ln(4/3)."""
    chosen = torch.tensor([LN3, LN3])
    rejected = torch.tensor([0.0, 0.0])
    losses = pairwise_reward_loss(chosen, rejected, margin=torch.tensor([LN3, 0.0]))
    torch.testing.assert_close(losses, torch.tensor([LN2, math.log(4 / 3)]))


def test_pairwise_reward_loss_gradient_signs():
    """d/dr_c [-ln σ(d)] = -(1 - σ(d)) < 0 and the opposite for r_r; at d = 0 they are ∓1/2."""
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    pairwise_reward_loss(chosen, rejected).sum().backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.5]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.5]))


def test_pairwise_reward_loss_is_finite_for_large_gaps():
    """-ln σ(-200) ≈ 200 (no overflow to inf)."""
    loss = pairwise_reward_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    torch.testing.assert_close(loss, torch.tensor([200.0]))


def test_pairwise_accuracy_counts_ties_as_wrong():
    """[1,2,3] vs [0,2,4]: higher, tie, lower → [1, 0, 0]."""
    chosen = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    accuracy = pairwise_accuracy(chosen, torch.tensor([0.0, 2.0, 4.0]))
    torch.testing.assert_close(accuracy, torch.tensor([1.0, 0.0, 0.0]))
    assert not accuracy.requires_grad


# --- DPO ------------------------------------------------------------------------------------


def _logps(*values):
    return torch.tensor(values, dtype=torch.float32)


def _at_reference(beta, loss_type, label_smoothing=0.0):
    """Policy equal to reference: h = 0 for both pairs (and h̄ = 0 whatever the lengths)."""
    policy_chosen, policy_rejected = _logps(-3.0, -7.0), _logps(-5.0, -2.0)
    return dpo_loss(
        policy_chosen,
        policy_rejected,
        policy_chosen.clone(),
        policy_rejected.clone(),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=torch.tensor([3, 7]),
        rejected_lengths=torch.tensor([5, 2]),
    )


def test_dpo_at_reference_hand_worked():
    """h = 0: sigmoid -ln σ(0) = ln 2; hinge relu(1 - 0) = 1; ipo (0 - 1/(2·0.1))² = 5² = 25 = 1/(4β²).

    cDPO (ε = 0.1): -(0.9 + 0.1)·ln(1/2) = ln 2. robust (ε = 0.2): (0.8·ln 2 + 0.2·ln(1/2)) / 0.6
    = 0.6·ln 2 / 0.6 = ln 2. All implicit rewards are 0.
    """
    out = _at_reference(0.1, "sigmoid")
    assert isinstance(out, DPOOutput)
    torch.testing.assert_close(out.losses, torch.full((2,), LN2))
    torch.testing.assert_close(out.chosen_rewards, torch.zeros(2))
    torch.testing.assert_close(out.rejected_rewards, torch.zeros(2))
    torch.testing.assert_close(_at_reference(0.1, "hinge").losses, torch.ones(2))
    torch.testing.assert_close(_at_reference(0.1, "ipo").losses, torch.full((2,), 1 / (4 * 0.1**2)))
    torch.testing.assert_close(_at_reference(0.1, "sigmoid", 0.1).losses, torch.full((2,), LN2))
    torch.testing.assert_close(_at_reference(0.1, "robust", 0.2).losses, torch.full((2,), LN2))


def _h_equals_two(beta, loss_type, label_smoothing=0.0):
    """pc = -1, rc = -2, pr = -3, rr = -2: chosen log-ratio 1, rejected -1, h = 1 - (-1) = 2.

    Both responses are one token long, so the length-averaged margin of ipo is h̄ = h = 2 too.
    """
    return dpo_loss(
        _logps(-1.0),
        _logps(-3.0),
        _logps(-2.0),
        _logps(-2.0),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=torch.tensor([1]),
        rejected_lengths=torch.tensor([1]),
    )


def test_dpo_sigmoid_cdpo_and_robust_hand_worked():
    """h = 2, β = ln(3)/2 so βh = ln 3: σ(βh) = 3/4, σ(-βh) = 1/4.

    sigmoid ε=0:   -ln(3/4) = ln(4/3) = 0.287682
    cDPO ε=0.1:    0.9·ln(4/3) + 0.1·ln 4 = 0.258914 + 0.138629 = 0.397543
    robust ε=0.1:  (0.9·ln(4/3) + 0.1·ln(1/4)) / 0.8 = (0.258914 - 0.138629) / 0.8 = 0.150356
    rewards:       β·1 = ln(3)/2 = 0.549306 and β·(-1) = -0.549306
    """
    beta = LN3 / 2
    plain = _h_equals_two(beta, "sigmoid")
    torch.testing.assert_close(plain.losses, _logps(0.287682))
    torch.testing.assert_close(plain.chosen_rewards, _logps(0.549306))
    torch.testing.assert_close(plain.rejected_rewards, _logps(-0.549306))
    torch.testing.assert_close(_h_equals_two(beta, "sigmoid", 0.1).losses, _logps(0.397543))
    torch.testing.assert_close(_h_equals_two(beta, "robust", 0.1).losses, _logps(0.150356))


def test_dpo_hinge_and_ipo_hand_worked():
    """h = 2. hinge: relu(1 - 0.25·2) = 0.5, relu(1 - 1·2) = 0.

    ipo: (2 - 1/(2·0.5))² = (2 - 1)² = 1; (2 - 1/(2·0.25))² = (2 - 2)² = 0; (2 - 1/(2·1))² = 1.5² = 2.25.
    """
    torch.testing.assert_close(_h_equals_two(0.25, "hinge").losses, _logps(0.5))
    torch.testing.assert_close(_h_equals_two(1.0, "hinge").losses, _logps(0.0))
    torch.testing.assert_close(_h_equals_two(0.5, "ipo").losses, _logps(1.0))
    torch.testing.assert_close(_h_equals_two(0.25, "ipo").losses, _logps(0.0))
    torch.testing.assert_close(_h_equals_two(1.0, "ipo").losses, _logps(2.25))


def test_dpo_ipo_averages_logps_over_tokens_hand_worked():
    """IPO on length-averaged log-probs (Azar et al. 2023; TRL), β = 0.5 so 1/(2β) = 1.

    Pair 1: pc = -6, rc = -9 over 3 chosen tokens → chosen log-ratio 3, averaged 3/3 = 1;
            pr = -8, rr = -4 over 4 rejected tokens → rejected log-ratio -4, averaged -4/4 = -1;
            h̄ = 1 - (-1) = 2, loss (2 - 1)² = 1 (summed h = 7 would give (7 - 1)² = 36).
    Pair 2: pc = -1, rc = -1.5 over 0 chosen tokens (counted as 1) → 0.5;
            pr = -2, rr = -2 over 2 tokens → 0; h̄ = 0.5, loss (0.5 - 1)² = 0.25.
    Gradients: dL/dpc = 2(h̄ - 1)/|y_c| → 2·1/3 = 2/3 and 2·(-0.5)/1 = -1;
               dL/dpr = -2(h̄ - 1)/|y_r| → -2·1/4 = -0.5 and -2·(-0.5)/2 = 0.5.
    Rewards stay on summed log-ratios: β·3 = 1.5, β·0.5 = 0.25; β·(-4) = -2, β·0 = 0.
    """
    policy_chosen = _logps(-6.0, -1.0).requires_grad_()
    policy_rejected = _logps(-8.0, -2.0).requires_grad_()
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        _logps(-9.0, -1.5),
        _logps(-4.0, -2.0),
        beta=0.5,
        loss_type="ipo",
        chosen_lengths=torch.tensor([3, 0]),
        rejected_lengths=torch.tensor([4, 2]),
    )
    torch.testing.assert_close(out.losses, _logps(1.0, 0.25))
    torch.testing.assert_close(out.chosen_rewards, _logps(1.5, 0.25))
    torch.testing.assert_close(out.rejected_rewards, _logps(-2.0, 0.0))
    out.losses.sum().backward()
    torch.testing.assert_close(policy_chosen.grad, _logps(2 / 3, -1.0))
    torch.testing.assert_close(policy_rejected.grad, _logps(-0.5, 0.5))


def test_dpo_ipo_requires_lengths_and_other_losses_ignore_them():
    """ipo without token counts is refused, naming them; sigmoid gives ln 2 at h = 0 with or without."""
    logps = _logps(-1.0)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(logps, logps, logps, logps, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        dpo_loss(logps, logps, logps, logps, beta=0.1, loss_type="ipo", chosen_lengths=torch.tensor([1]))
    lengths = {"chosen_lengths": torch.tensor([5]), "rejected_lengths": torch.tensor([7])}
    with_lengths = dpo_loss(logps, logps, logps, logps, beta=0.1, **lengths)
    torch.testing.assert_close(with_lengths.losses, _logps(LN2))


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_gradient_signs(loss_type, label_smoothing):
    """At h = 0, raising the chosen log-prob lowers the loss and raising the rejected one raises it.

    sigmoid/cDPO: dL/dh = -β(1 - 2ε)/2 < 0 for ε < 0.5; robust: -β/2; hinge: -β; ipo (lengths 4):
    dL/dh̄ = 2(0 - 1/(2β)) < 0 and dh̄/dlog π(y_c|x) = 1/4.
    The reference log-probs get no gradient.
    """
    policy_chosen = _logps(-4.0).requires_grad_()
    policy_rejected = _logps(-4.0).requires_grad_()
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        _logps(-4.0),
        _logps(-4.0),
        beta=0.5,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=torch.tensor([4]),
        rejected_lengths=torch.tensor([4]),
    )
    out.losses.sum().backward()
    assert policy_chosen.grad.item() < 0
    assert policy_rejected.grad.item() > 0
    torch.testing.assert_close(policy_chosen.grad, -policy_rejected.grad)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def _reference_sigmoid_dpo(pc, pr, rc, rr, beta, epsilon):
    """Per-pair DPO/cDPO written out with Python floats: -(1-ε)·ln σ(βh) - ε·ln σ(-βh)."""
    losses = []
    for chosen, rejected, ref_chosen, ref_rejected in zip(pc, pr, rc, rr):
        h = (chosen - ref_chosen) - (rejected - ref_rejected)
        log_sigmoid_pos = -math.log1p(math.exp(-beta * h))
        log_sigmoid_neg = -math.log1p(math.exp(beta * h))
        losses.append(-(1 - epsilon) * log_sigmoid_pos - epsilon * log_sigmoid_neg)
    return losses


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_dpo_sigmoid_matches_independent_implementation(label_smoothing):
    generator = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-20 * torch.rand(16, generator=generator, dtype=torch.float64) for _ in range(4))
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=label_smoothing)
    expected = _reference_sigmoid_dpo(
        pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), 0.3, label_smoothing
    )
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc))
    torch.testing.assert_close(out.rejected_rewards, 0.3 * (pr - rr))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"beta": 0.1, "loss_type": "kto"}, "loss_type"),
        ({"beta": 0.1, "loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.6}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": -0.1}, "label_smoothing"),
        ({"beta": 0.1, "loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_dpo_rejects_bad_arguments(kwargs, message):
    logps = _logps(-1.0)
    with pytest.raises(ValueError, match=message):
        dpo_loss(logps, logps, logps, logps, **kwargs)


def test_chosen_nll_hand_worked():
    """logps [-6, -3], lengths [3, 0]: -(-6)/3 = 2 and -(-3)/max(0, 1) = 3; d/dlogp = -1/length."""
    logps = _logps(-6.0, -3.0).requires_grad_()
    nll = chosen_nll(logps, torch.tensor([3, 0]))
    torch.testing.assert_close(nll, _logps(2.0, 3.0))
    nll.sum().backward()
    torch.testing.assert_close(logps.grad, _logps(-1 / 3, -1.0))


def test_implicit_reward_accuracy_hand_worked():
    """[0.5, 0, -1] vs [0.1, 0, 2]: higher, tie, lower → [1, 0, 0], detached."""
    chosen = _logps(0.5, 0.0, -1.0).requires_grad_()
    accuracy = implicit_reward_accuracy(chosen, _logps(0.1, 0.0, 2.0))
    torch.testing.assert_close(accuracy, _logps(1.0, 0.0, 0.0))
    assert not accuracy.requires_grad
