"""The GRPO/RLOO stage: step-1 identities on a small model, and a quality bar on the built-in task."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import yaml

from align.rewards import REWARDS
from align.runner import run_job
from align.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def metrics_of(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {n} even or odd?"}) + "\n" for n in range(17, 41)))
    return path


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_two_steps_start_at_the_reference(
    kind, small_model, small_data, prompts_file, job_factory, tmp_path, monkeypatch
):
    # The random small model never answers the parity prompts; a stand-in reward that varies within
    # each group gives nonzero advantages, so the first step moves the policy.
    monkeypatch.setitem(REWARDS, "exact_answer", lambda prompt, completion: float(len(completion) % 3))
    job = job_factory(
        small_model,
        [
            {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
            {"type": kind, "data": {"path": str(prompts_file)}, "reward": "exact_answer", "group_size": 3,
             "batch_size": 2, "max_new_tokens": 5, "max_steps": 2, "lr": 1e-2, "kl_coef": 0.1, "max_length": 48},
        ],
    )
    sft, grpo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    records = [r for r in metrics_of(tmp_path / "work", kind) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    # The policy starts as the frozen reference (the SFT adapter) and samples were drawn from it.
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["clip_fraction"] == 0.0
    assert 1 <= first["response_length"] <= 5
    assert first["flat_group_fraction"] < 1.0
    for key in ("loss", "reward_mean", "reward_std", "accuracy"):
        assert math.isfinite(first[key]), key
    # After a large step the policy has moved away from the reference.
    assert records[1]["kl"] > 0
    manifest = json.loads((Path(grpo.artifact.uri) / "manifest.json").read_text())
    assert manifest["parents"] == [sft.artifact.artifact_id]
    assert manifest["stage"] == {"type": kind, "index": 1, "name": kind}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= {
        p.name for p in Path(grpo.artifact.uri).iterdir()
    }


def quality_job():
    """examples/tiny-sft-grpo.yaml, shortened to fit a CPU test: float32, the example's two SFT epochs
    without SFT-side evaluation (the GRPO stage evaluates its starting policy, which is the SFT policy, at
    step 0), and 8 GRPO steps at a higher learning rate. Shorter SFT leaves the base model's right answers
    in place, and GRPO would have nothing to fix."""
    data = yaml.safe_load((REPO / "examples" / "tiny-sft-grpo.yaml").read_text())
    data["deepspeed"]["precision"] = "fp32"
    sft, grpo = data["stages"]
    sft.update(eval_exact_match=False, data={"path": sft["data"]["path"]})
    grpo.update(max_steps=12, lr=1.0e-3)
    return parse_spec(data)


def test_grpo_raises_held_out_accuracy_over_sft(tmp_path):
    started = time.perf_counter()
    run_job(quality_job(), work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    evals = [r for r in metrics_of(tmp_path / "work", "grpo") if "eval_exact_match" in r]
    # Step 0 evaluates the starting policy (the SFT policy); the last record, the trained one.
    assert [r["step"] for r in evals] == [0, 12]
    before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
    print(f"held-out greedy accuracy (builtin:parity/eval): sft {before:.3f} -> grpo {after:.3f}, "
          f"{time.perf_counter() - started:.0f}s")
    assert after >= before + 0.25


def test_kl_in_the_reward_matches_kl_in_the_loss_until_the_policy_moves(
    small_model, small_data, prompts_file, job_factory, tmp_path, monkeypatch
):
    # At the first step the policy is its reference: the KL is 0 wherever it goes, and the k3 loss
    # term has zero gradient there, so both placements make the same first update. After it, the
    # KL is no longer 0 and the two differ.
    monkeypatch.setitem(REWARDS, "exact_answer", lambda prompt, completion: float(len(completion) % 3))
    traces = {}
    for penalty in ("loss", "reward"):
        job = job_factory(small_model, [
            {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
            {"type": "rloo", "data": {"path": str(prompts_file)}, "reward": "exact_answer", "group_size": 3,
             "batch_size": 2, "max_new_tokens": 5, "max_steps": 2, "lr": 1e-2, "kl_coef": 0.5,
             "kl_penalty": penalty, "max_length": 48, "eval_exact_match": False},
        ])
        run_job(job, work_root=tmp_path / penalty, artifact_root=str(tmp_path / "artifacts" / penalty))
        traces[penalty] = [r for r in metrics_of(tmp_path / penalty, "rloo") if "loss" in r]
    first_loss, second_loss = traces["loss"]
    first_reward, second_reward = traces["reward"]
    assert first_loss["kl"] == first_reward["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first_reward["loss"] == pytest.approx(first_loss["loss"], abs=1e-6)
    assert second_reward["reward_mean"] == pytest.approx(second_loss["reward_mean"])  # same samples at step 2
    assert second_reward["kl"] > 0 and second_reward["loss"] != pytest.approx(second_loss["loss"], abs=1e-6)
