"""Scored held-out generations in a preference stage: on the built-in parity task a short DPO stage from the SFT
policy raises the reward of its sampled replies and wins against the SFT policy's replies, and a gate with no
metric gates on that win rate."""

from __future__ import annotations

import json
import time

import pytest
import torch

from align.evaluate_generations import PARENT_SCORES
from align.rewards import REWARDS
from align.runner import run_job
from align.spec import parse_spec


def test_dpo_replies_beat_the_sft_policy_replies_under_the_exact_answer_reward(parity_sft):
    """The DPO stage of examples/tiny-sft-dpo.yaml from the shared SFT artifact, cut to 8 steps at a constant
    learning rate, with its held-out replies sampled at temperature 0.7 and scored by `exact_answer`. Step 0 is
    the SFT policy's evaluation: its replies are the parent's, so it wins exactly half against itself."""
    example, sft_id, root = parity_sft
    stage = {**example["stages"][1], "eval_exact_match": False, "max_steps": 8, "lr": 1e-3,
             "lr_scheduler": "constant", "eval_reward": "exact_answer", "max_new_tokens": 8, "temperature": 0.7,
             "gate": {"min_delta_vs_parent": 0.05}}
    job = parse_spec({**example, "name": "scored-dpo", "base_model": f"artifact:{sft_id}", "stages": [stage]})
    started = time.perf_counter()
    (trained,) = run_job(job, work_root=root / "scored-dpo", artifact_root=str(root / "artifacts"))
    work = root / "scored-dpo" / "dpo"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    before, after = [r for r in records if "eval_win_rate" in r]
    print(f"held-out reply reward (exact_answer): sft {before['eval_reward_mean']:.3f} -> dpo "
          f"{after['eval_reward_mean']:.3f}, win rate {after['eval_win_rate']:.3f}; "
          f"{time.perf_counter() - started:.0f} s")
    assert (before["step"], after["step"]) == (0, 8)
    assert before["eval_win_rate"] == 0.5
    # One 0/1 score per prompt: the win rate is 1/2 plus half the rise of the mean reward.
    gain = after["eval_reward_mean"] - before["eval_reward_mean"]
    assert after["eval_win_rate"] == pytest.approx(0.5 + gain / 2)
    assert gain >= 0.1
    assert after["eval_win_rate"] > 0.55
    parent = torch.load(work / PARENT_SCORES)["scores"]
    assert parent.shape == (128, 1) and parent.mean().item() == before["eval_reward_mean"]
    assert trained.metrics["eval_win_rate"] == after["eval_win_rate"]
    gate = trained.artifact.manifest.gate
    assert (gate["metric"], gate["baseline"], gate["value"], gate["passed"]) == (
        "eval_win_rate", 0.5, after["eval_win_rate"], True)


# --- on the small model -----------------------------------------------------------------------------------


def reply_length_reward(prompt: str, reply: str) -> float:
    """A stand-in for `exact_answer`, which the random small model never earns: the reply's length modulo 3."""
    return float(len(reply) % 3)


def metrics_of(work, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_stage_compares_with_the_parent_scores_of_its_first_attempt(
    small_model, small_data, job_factory, tmp_path, monkeypatch
):
    """Run a two-step DPO stage that checkpoints after step 1, put scores below any reply's in place of the
    parent's, and run it again in the same folder: it resumes at step 1 and compares with the kept scores
    (every reply wins) instead of sampling parent replies from the policy it has trained since."""
    monkeypatch.setitem(REWARDS, "exact_answer", reply_length_reward)
    stage = {"type": "dpo", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25}, "batch_size": 4,
             "max_steps": 2, "lr": 1e-2, "checkpoint_every": 1, "max_length": 48, "eval_reward": "exact_answer",
             "max_new_tokens": 5, "eval_samples": 2}
    job = job_factory(small_model, [stage])
    run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    first = [r for r in metrics_of(tmp_path / "work", "dpo") if "eval_win_rate" in r]
    assert [r["step"] for r in first] == [0, 2] and first[0]["eval_win_rate"] == 0.5
    parent_file = tmp_path / "work" / "dpo" / PARENT_SCORES
    assert torch.load(parent_file)["scores"].shape == (12, 2)
    torch.save({"scores": torch.full((12, 2), -1.0)}, parent_file)

    run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    again = [r for r in metrics_of(tmp_path / "work", "dpo") if "eval_win_rate" in r]
    assert [r["step"] for r in again] == [0, 2]
    assert again[0] == first[0], "the step-0 evaluation is kept"
    assert again[1]["eval_reward_mean"] == first[1]["eval_reward_mean"], "the resumed run ends where the first did"
    assert again[1]["eval_win_rate"] == 1.0
    assert torch.equal(torch.load(parent_file)["scores"], torch.full((12, 2), -1.0))


@pytest.mark.parametrize("stage", [
    {"type": "grpo", "group_size": 2, "eval_exact_match": False},
    {"type": "ppo", "critic_init": "policy", "ppo_epochs": 1, "eval_samples": 2},
], ids=["grpo", "ppo"])
def test_an_online_stage_reports_its_win_rate_against_its_starting_policy(
    stage, small_model, tmp_path, job_factory, monkeypatch
):
    monkeypatch.setitem(REWARDS, "exact_answer", reply_length_reward)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Is {n} even or odd?"}) + "\n" for n in range(17, 33)))
    online = {**stage, "data": {"path": str(prompts), "eval_fraction": 0.25}, "reward": "exact_answer",
              "batch_size": 4, "max_new_tokens": 5, "max_length": 48, "max_steps": 1, "lr": 1e-2,
              "gate": {"min": 0.0}}
    (result,) = run_job(job_factory(small_model, [online]), work_root=tmp_path / "work",
                        artifact_root=str(tmp_path / "artifacts"))
    before, after = [r for r in metrics_of(tmp_path / "work", stage["type"]) if "eval_win_rate" in r]
    assert (before["step"], before["eval_win_rate"]) == (0, 0.5)
    assert after["step"] == 1 and 0.0 <= after["eval_win_rate"] <= 1.0
    assert result.metrics["eval_reward_mean"] == after["eval_reward_mean"]
    assert result.artifact.manifest.gate["metric"] == "eval_win_rate"
    parent = torch.load(tmp_path / "work" / stage["type"] / PARENT_SCORES)["scores"]
    assert parent.shape == (4, stage.get("eval_samples", 1))
