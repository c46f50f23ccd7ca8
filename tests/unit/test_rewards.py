"""Which reward scores count as a right completion (the online stages' ``accuracy``)."""

from __future__ import annotations

import pytest
import torch

from align.rewards import Scorer, reward_success


def test_exact_answer_counts_only_a_full_score_as_right():
    """exact_answer scores 1.0 for the right answer and 0.0 otherwise; a partial 0.5 (which a scaled or
    shaped reward could give) is not a success, and neither is 1.0 - 1e-9."""
    scorer = Scorer.named(pad=0, name="exact_answer")
    scores = torch.tensor([1.0, 0.0, 0.5, 1.0 - 1e-9, 1.0], dtype=torch.float64)
    assert scorer.successes(scores).tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert scorer.successes(scores).mean().item() == pytest.approx(0.4)


def test_reward_model_scores_have_no_success_reading():
    """A reward model's score is a preference logit: no threshold means "right", so no accuracy is logged."""
    assert Scorer(pad=0, model=object()).successes(torch.tensor([3.0, -1.0])) is None


def test_unknown_reward_name_is_refused_like_the_reward_function():
    with pytest.raises(ValueError, match="nope"):
        reward_success("nope")
