"""Parity of align's DPO-family losses with their papers and with TRL's DPOTrainer.

Each loss name in the spec is checked against its published formula, written out here with Python
floats independently of align.losses. The cases where align and TRL mean the same formula
(sigmoid without label smoothing, hinge, robust, ipo on length-averaged log-probs) are checked
against TRL's own loss code on identical log-probs (batch 64, β 0.1 / 0.5 / 1.0). Two deliberate
differences are pinned: sigmoid with label_smoothing > 0 is the cDPO formula, which TRL's sigmoid
does not apply, and the RPO NLL term is averaged per pair, where TRL averages over all tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from align.losses import chosen_nll, dpo_loss
from align.ops.aggregate import accumulation_scale

BATCH = 64
BETAS = [0.1, 0.5, 1.0]
TOLERANCE = {"atol": 1e-6, "rtol": 1e-6}


# --- Identical inputs -------------------------------------------------------------------------


def _pairs(seed: int) -> dict:
    """BATCH random pairs: summed log-probs of responses 1..40 tokens long, about -1 per token.

    float64, so that any disagreement is in the formula and not in rounding.
    """
    generator = torch.Generator().manual_seed(seed)
    chosen_lengths = torch.randint(1, 41, (BATCH,), generator=generator)
    rejected_lengths = torch.randint(1, 41, (BATCH,), generator=generator)

    def logps(lengths):
        per_token = -2 * torch.rand(BATCH, generator=generator, dtype=torch.float64)
        return per_token * lengths

    return {
        "policy_chosen": logps(chosen_lengths),
        "policy_rejected": logps(rejected_lengths),
        "reference_chosen": logps(chosen_lengths),
        "reference_rejected": logps(rejected_lengths),
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }


def _align_losses(pairs: dict, beta: float, loss_type: str, label_smoothing: float = 0.0) -> torch.Tensor:
    return dpo_loss(
        pairs["policy_chosen"],
        pairs["policy_rejected"],
        pairs["reference_chosen"],
        pairs["reference_rejected"],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=pairs["chosen_lengths"],
        rejected_lengths=pairs["rejected_lengths"],
    ).losses


# --- Published formulas, one pair at a time ---------------------------------------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _margin(pair: dict) -> float:
    """h = log[π(y_c)·π_ref(y_r) / (π(y_r)·π_ref(y_c))] on summed log-probs."""
    return (pair["policy_chosen"] - pair["reference_chosen"]) - (
        pair["policy_rejected"] - pair["reference_rejected"]
    )


def dpo_formula(pair: dict, beta: float, epsilon: float) -> float:
    """Rafailov et al. 2023, Eq. 7: -log σ(βh); Mitchell 2023 (cDPO): -(1-ε)·log σ(βh) - ε·log σ(-βh)."""
    h = _margin(pair)
    return -(1 - epsilon) * _log_sigmoid(beta * h) - epsilon * _log_sigmoid(-beta * h)


def robust_formula(pair: dict, beta: float, epsilon: float) -> float:
    """Chowdhury et al. 2024 (rDPO): [(1-ε)·L(y_c ≻ y_r) - ε·L(y_r ≻ y_c)] / (1 - 2ε), L = -log σ(βh)."""
    h = _margin(pair)
    return ((1 - epsilon) * -_log_sigmoid(beta * h) - epsilon * -_log_sigmoid(-beta * h)) / (1 - 2 * epsilon)


def hinge_formula(pair: dict, beta: float, epsilon: float) -> float:
    """SLiC-HF (Zhao et al. 2023): β·max(0, δ - h) with δ = 1/β, on the reference log-ratio h."""
    return max(0.0, 1 - beta * _margin(pair))


def ipo_formula(pair: dict, beta: float, epsilon: float) -> float:
    """Azar et al. 2023, Eq. 17: (h - 1/(2τ))², τ = β, h on log-probs averaged over each response's tokens."""
    chosen = (pair["policy_chosen"] - pair["reference_chosen"]) / pair["chosen_lengths"]
    rejected = (pair["policy_rejected"] - pair["reference_rejected"]) / pair["rejected_lengths"]
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def rpo_nll_formula(pair: dict) -> float:
    """Pang et al. 2024 (RPO): the chosen response's NLL divided by its length, per pair."""
    return -pair["policy_chosen"] / pair["chosen_lengths"]


def _each_pair(pairs: dict) -> list[dict]:
    columns = {name: values.tolist() for name, values in pairs.items()}
    return [{name: columns[name][i] for name in columns} for i in range(BATCH)]


FORMULAS = {"sigmoid": dpo_formula, "robust": robust_formula, "hinge": hinge_formula, "ipo": ipo_formula}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [
        ("sigmoid", 0.0),
        ("sigmoid", 0.1),
        ("sigmoid", 0.5),
        ("robust", 0.0),
        ("robust", 0.2),
        ("hinge", 0.0),
        ("ipo", 0.0),
    ],
)
def test_each_loss_matches_its_published_formula(loss_type, label_smoothing, beta):
    pairs = _pairs(seed=1)
    expected = [FORMULAS[loss_type](pair, beta, label_smoothing) for pair in _each_pair(pairs)]
    torch.testing.assert_close(
        _align_losses(pairs, beta, loss_type, label_smoothing),
        torch.tensor(expected, dtype=torch.float64),
        **TOLERANCE,
    )


def test_chosen_nll_matches_rpo_formula():
    pairs = _pairs(seed=2)
    expected = [rpo_nll_formula(pair) for pair in _each_pair(pairs)]
    torch.testing.assert_close(
        chosen_nll(pairs["policy_chosen"], pairs["chosen_lengths"]),
        torch.tensor(expected, dtype=torch.float64),
        **TOLERANCE,
    )


# --- TRL's DPOTrainer loss on the same log-probs ----------------------------------------------


class _TokenLogps(torch.nn.Module):
    """Stands in for the policy: per-token log-probs whose sums are given sequence log-probs.

    Row i of the batch ([chosen rows, then rejected rows]) has one prompt token and then
    ``lengths[i]`` completion tokens, each with log-prob ``logps[i] / lengths[i]``. The output has
    the fields TRL's loss reads from its fused LM head: ``log_probs`` (0 outside the completion,
    as for ignored labels), ``entropy``, ``mean_logits``, ``is_top1``.
    """

    def __init__(self, logps: torch.Tensor, lengths: torch.Tensor):
        super().__init__()
        width = int(lengths.max()) + 1
        self.completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])
        shifted = self.completion_mask[:, 1:]
        self.token_logps = torch.where(
            shifted, (logps / lengths)[:, None], torch.zeros((), dtype=logps.dtype)
        )

    def forward(self, **_):
        zeros = torch.zeros_like(self.token_logps)
        return SimpleNamespace(
            log_probs=self.token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def trl_loss(
    pairs: dict,
    beta: float,
    loss_types: list[str],
    label_smoothing: float = 0.0,
    loss_weights: list[float] | None = None,
) -> float:
    """TRL's ``DPOTrainer.compute_loss`` (batch mean) on ``pairs``, without a model or a dataset.

    TRL comes with the dev extra; the parity here is with TRL 1.16.

    The trainer is made with ``__new__`` and given the attributes its ``__init__`` copies from
    ``DPOConfig`` (defaults otherwise: no LD-DPO, reverse KL, no WPO weighting) and the reference
    log-probs precomputed, as ``precompute_ref_log_probs=True`` does.
    """
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta = beta
    trainer.loss_types = loss_types
    trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
    trainer.label_smoothing = label_smoothing
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.use_weighting = False
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer.model = SimpleNamespace(training=False)
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0

    policy = _TokenLogps(
        torch.cat([pairs["policy_chosen"], pairs["policy_rejected"]]),
        torch.cat([pairs["chosen_lengths"], pairs["rejected_lengths"]]),
    )
    inputs = {
        "input_ids": torch.zeros(policy.completion_mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(policy.completion_mask.shape, dtype=torch.long),
        "completion_mask": policy.completion_mask.long(),
        "ref_chosen_logps": pairs["reference_chosen"],
        "ref_rejected_logps": pairs["reference_rejected"],
    }
    return trainer.compute_loss(policy, inputs).item()


def _one_pair(pairs: dict, i: int) -> dict:
    return {name: values[i : i + 1] for name, values in pairs.items()}


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2), ("ipo", 0.0)],
)
def test_same_formula_cases_match_trl(loss_type, label_smoothing, beta):
    """Batch mean over 64 pairs and the first 8 pairs one at a time (TRL returns only the mean)."""
    pairs = _pairs(seed=3)
    align_losses = _align_losses(pairs, beta, loss_type, label_smoothing)
    assert trl_loss(pairs, beta, [loss_type], label_smoothing) == pytest.approx(
        align_losses.mean().item(), rel=1e-6, abs=1e-6
    )
    for i in range(8):
        assert trl_loss(_one_pair(pairs, i), beta, [loss_type], label_smoothing) == pytest.approx(
            align_losses[i].item(), rel=1e-6, abs=1e-6
        )


def test_ipo_on_summed_logps_would_differ_from_trl():
    """The length averaging matters: IPO's formula on summed log-probs is far from TRL's ipo."""
    pairs = _pairs(seed=3)
    summed = {**pairs, "chosen_lengths": torch.ones(BATCH), "rejected_lengths": torch.ones(BATCH)}
    summed_mean = sum(ipo_formula(pair, 0.5, 0.0) for pair in _each_pair(summed)) / BATCH
    assert abs(trl_loss(pairs, 0.5, ["ipo"]) - summed_mean) > 1.0


@pytest.mark.parametrize("beta", BETAS)
def test_sigmoid_label_smoothing_is_cdpo_not_trls_sigmoid(beta):
    """align's sigmoid with ε > 0 is cDPO; TRL 1.16's sigmoid leaves label_smoothing unused.

    TRL applies label_smoothing only in its robust, exo_pair and aot losses, so its sigmoid with
    ε = 0.1 is plain DPO: equal to align's ε = 0 and different from align's ε = 0.1 by
    ε·(log σ(βh) - log σ(-βh)) = ε·βh per pair.
    """
    pairs = _pairs(seed=4)
    epsilon = 0.1
    cdpo = _align_losses(pairs, beta, "sigmoid", epsilon)
    expected = [dpo_formula(pair, beta, epsilon) for pair in _each_pair(pairs)]
    torch.testing.assert_close(cdpo, torch.tensor(expected, dtype=torch.float64), **TOLERANCE)

    trl_smoothed = trl_loss(pairs, beta, ["sigmoid"], epsilon)
    plain = _align_losses(pairs, beta, "sigmoid")
    assert trl_smoothed == pytest.approx(plain.mean().item(), rel=1e-6, abs=1e-6)
    h = (pairs["policy_chosen"] - pairs["reference_chosen"]) - (
        pairs["policy_rejected"] - pairs["reference_rejected"]
    )
    torch.testing.assert_close(cdpo - plain, epsilon * beta * h, **TOLERANCE)
    assert abs(cdpo.mean().item() - trl_smoothed) > 1e-3


def test_rpo_nll_per_pair_matches_trl_and_batch_mean_is_per_pair():
    """The NLL term: per pair TRL's ``sft`` loss and ``chosen_nll`` agree; over a batch they differ.

    align's DPO stage sums ``α · chosen_nll`` over pairs and scales the sum by
    ``accumulation_scale`` (1 / pairs in the step): a mean over pairs of each pair's per-token
    NLL, as in Pang et al. 2024. TRL's ``sft`` loss (RPO is ``loss_type=["sigmoid", "sft"]``,
    ``loss_weights=[1, α]``) is the mean over all chosen tokens of the batch, so a pair counts by
    its length: Σ NLL_i / Σ |y_i| = Σ |y_i|·chosen_nll_i / Σ |y_i|.
    """
    pairs = _pairs(seed=5)
    alpha, beta = 0.5, 0.1
    nll = chosen_nll(pairs["policy_chosen"], pairs["chosen_lengths"])
    for i in range(8):
        assert trl_loss(_one_pair(pairs, i), beta, ["sft"]) == pytest.approx(
            nll[i].item(), rel=1e-6, abs=1e-6
        )

    dpo = _align_losses(pairs, beta, "sigmoid")
    stage_loss = (dpo.sum() + alpha * nll.sum()) * accumulation_scale(BATCH, 1, 1)
    lengths = pairs["chosen_lengths"].double()
    token_weighted = (lengths * nll).sum() / lengths.sum()
    trl_rpo = trl_loss(pairs, beta, ["sigmoid", "sft"], loss_weights=[1.0, alpha])
    assert stage_loss.item() == pytest.approx(dpo.mean().item() + alpha * nll.mean().item(), rel=1e-9)
    assert trl_rpo == pytest.approx(dpo.mean().item() + alpha * token_weighted.item(), rel=1e-6, abs=1e-6)
    assert abs(nll.mean().item() - token_weighted.item()) > 1e-3
