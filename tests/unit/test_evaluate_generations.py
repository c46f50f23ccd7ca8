"""Scored held-out generations: the win rate against the parent on hand-worked scores, the table of sampled
scores, and the parent's scores kept for a resumed stage."""

from __future__ import annotations

import pytest
import torch

from align.engine.dist import Rank
from align.evaluate import rank_share
from align.evaluate_generations import (
    HeldOutReplies,
    ParentScores,
    ReplySampling,
    prompt_wins,
    sample_scores,
    win_rate,
)
from align.generation import Completion
from align.rewards import Scorer
from align.stages.rollout import sampling_seed

ONE = Rank(rank=0, world_size=1, local_rank=0)


def test_prompt_wins_count_ties_as_half():
    """One reply per prompt. Prompt 0: 1 > 0, a win (1). Prompt 1: 0 < 1, a loss (0). Prompt 2: 0.5 = 0.5, a
    tie (1/2). Prompt 3: 3 > 2, a win (1). Win rate (1 + 0 + 1/2 + 1) / 4 = 0.625."""
    policy = torch.tensor([[1.0], [0.0], [0.5], [3.0]])
    parent = torch.tensor([[0.0], [1.0], [0.5], [2.0]])
    assert prompt_wins(policy, parent).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert win_rate(policy, parent) == 0.625


def test_with_several_replies_a_prompt_counts_its_share_of_won_pairs():
    """Policy replies score 1 and 3, the parent's 2 and 3. Pairs: (1, 2) lost, (1, 3) lost, (3, 2) won,
    (3, 3) tied: (0 + 0 + 1 + 1/2) / 4 = 0.375. The parent's replies may be fewer: against [2] alone the
    policy wins (3, 2) and loses (1, 2): 1/2."""
    assert prompt_wins(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 3.0]])).tolist() == [0.375]
    assert win_rate(torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0]])) == 0.5


def test_against_itself_the_win_rate_is_one_half():
    scores = torch.tensor([[0.0, 1.0], [2.0, -1.0], [5.0, 5.0]])
    assert win_rate(scores, scores) == 0.5


def test_with_one_binary_reply_the_win_rate_is_half_plus_half_the_gain():
    """With 0/1 scores and one reply per prompt a prompt is won (1, 0), lost (0, 1) or tied, so the win rate
    is 1/2 + (mean policy score - mean parent score) / 2: here 1/2 + (3/5 - 2/5) / 2 = 0.6."""
    policy = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0]])
    parent = torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0]])
    assert win_rate(policy, parent) == pytest.approx(0.5 + (policy.mean() - parent.mean()).item() / 2)
    assert win_rate(policy, parent) == pytest.approx(0.6)


def test_prompt_wins_refuse_different_prompts():
    with pytest.raises(ValueError, match="scores of 2 prompts against the parent's of 3"):
        prompt_wins(torch.zeros(2, 1), torch.zeros(3, 1))


def test_every_rank_share_covers_the_items_once_with_the_same_length():
    items = list(range(5))
    shares = [rank_share(items, Rank(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    assert [len(mine) for mine, _ in shares] == [3, 3]
    counted = [item for mine, keep in shares for item, k in zip(mine, keep) if k]
    assert sorted(counted) == items


class FakeGenerator:
    """Reply ``j`` to prompt ``[i]`` is ``"x" * i + "y" * j``; records the seed of each call."""

    pad_token_id = 0

    def __init__(self):
        self.seeds = []

    def generate(self, prompts, params):
        self.seeds.append(params.seed)
        return [Completion(index, [5] * (prompt[0] + j), "x" * prompt[0] + "y" * j, True)
                for index, prompt in enumerate(prompts) for j in range(params.num_samples)]


def test_sample_scores_fill_one_row_per_prompt_in_seeded_batches():
    """Five prompts, two replies each, two prompts per call: three calls, seeded per batch. The score of a
    reply is its length, so row i is [i, i + 1]."""
    prompts = [{"prompt_input_ids": [i], "prompt": f"q{i}"} for i in range(5)]
    scorer = Scorer(0, function=lambda prompt, reply: float(len(reply)))
    generator = FakeGenerator()
    sampling = ReplySampling(max_new_tokens=4, temperature=1.0, samples=2, seed=7, batch_size=2)
    scores = sample_scores(generator, scorer, prompts, ONE, sampling, torch.device("cpu"))
    assert scores.tolist() == [[i, i + 1] for i in range(5)]
    assert generator.seeds == [sampling_seed(7, -1, 0, batch) for batch in range(3)]


def test_the_first_evaluation_of_a_fresh_stage_is_the_parent_and_a_resumed_stage_reads_it(tmp_path):
    path = tmp_path / "parent_scores.pt"
    parent_scores = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    fresh = ParentScores(path, ONE, first_step=0)
    assert fresh.win_rate(parent_scores) == {"eval_win_rate": 0.5}
    assert path.exists() and not path.with_suffix(".partial").exists()
    later = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    # Prompt 0 won, prompt 2 lost, 1 and 3 tied: (1 + 1/2 + 0 + 1/2) / 4.
    assert fresh.win_rate(later) == {"eval_win_rate": 0.5}
    resumed = ParentScores(path, ONE, first_step=20)
    assert torch.equal(resumed.scores, parent_scores)
    assert resumed.win_rate(torch.ones(4, 1)) == {"eval_win_rate": 0.75}
    assert resumed.win_rate(torch.ones(3, 1)) == {}, "scores of other prompts are not compared"


def test_a_resumed_stage_without_the_parent_scores_says_so_and_reports_no_win_rate(tmp_path):
    said = []
    resumed = ParentScores(tmp_path / "parent_scores.pt", ONE, first_step=5, message=lambda *a: said.append(a))
    assert resumed.win_rate(torch.ones(2, 1)) == {}
    assert not (tmp_path / "parent_scores.pt").exists(), "a resumed stage never takes its policy for the parent"
    [(text, level)] = said
    assert level == "warning" and "eval_win_rate is not measured" in text


def test_held_out_replies_report_the_mean_score_and_the_win_rate(tmp_path):
    prompts = [{"prompt_input_ids": [i], "prompt": f"q{i}"} for i in range(3)]
    scorer = Scorer(0, function=lambda prompt, reply: float(len(reply)))
    sampling = ReplySampling(max_new_tokens=4, temperature=1.0, samples=1, seed=0, batch_size=8)
    replies = HeldOutReplies(FakeGenerator(), scorer, prompts, sampling,
                             ParentScores(tmp_path / "p.pt", ONE, first_step=0), torch.device("cpu"))
    # Replies of length 0, 1 and 2: mean 1.
    assert replies.evaluate(ONE) == {"eval_reward_mean": 1.0, "eval_win_rate": 0.5}
