"""The example jobs on the built-in tiny model and parity task: alignment is measurable and pinned with margins.

SFT learns the demonstrations' mistakes (most "tell me whether" answers are wrong), so it stays
clearly short of perfect on held-out prompts; DPO on preference pairs fixes them. The reward model
separates held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from align.runner import run_job
from align.spec import load_spec

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def test_sft_then_dpo_raises_held_out_accuracy(tmp_path):
    job = load_spec(EXAMPLES / "tiny-sft-dpo.yaml")
    sft, dpo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    sft_accuracy = sft.metrics["eval_exact_match"]
    dpo_accuracy = dpo.metrics["eval_exact_match"]
    print(f"held-out greedy accuracy: sft {sft_accuracy:.3f} -> dpo {dpo_accuracy:.3f}; "
          f"implicit-reward accuracy {dpo.metrics['eval_rewards_accuracy']:.3f}")
    assert 0.4 < sft_accuracy < 0.85, "SFT learns the demonstrations' mistakes"
    assert dpo_accuracy >= 0.92 and dpo_accuracy >= sft_accuracy + 0.15
    assert dpo.metrics["eval_rewards_accuracy"] >= 0.95
    assert dpo.artifact.manifest.parents == [sft.artifact.artifact_id]


def test_reward_model_separates_held_out_pairs(tmp_path):
    job = load_spec(EXAMPLES / "tiny-rm.yaml")
    (rm,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    assert rm.metrics["eval_accuracy"] >= 0.95
    assert rm.artifact.manifest.kind == "reward_model"
