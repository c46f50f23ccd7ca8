"""The KTO stage: it starts where the policy equals its reference (loss λ/2 per row), continues the SFT adapter,
trains alike on packed and padded batches and with live or precomputed reference log-probs, and on the built-in
parity task raises held-out greedy accuracy over the SFT policy from unpaired rows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from align.runner import run_job
from align.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def metrics_of(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def kto_stage(path: Path, **fields) -> dict:
    return {"type": "kto", "data": {"path": str(path), "eval_fraction": 0.25}, "batch_size": 4, "max_steps": 3,
            "lr": 1e-3, **fields}


def test_the_stage_starts_at_its_reference_and_continues_the_sft_adapter(small_model, small_data, job_factory,
                                                                           tmp_path):
    """The preference file gives each pair as a desirable and an undesirable row, as many of each. At step 0 the
    policy is its reference (the frozen SFT adapter), so every log-ratio and the KL estimate are 0 and a row's loss
    is λ·(1 - σ(0)) = λ/2: with λ_D = 2 and λ_U = 1 the mean is (2 · 0.5 + 1 · 0.5) / 2 = 0.75."""
    sft = {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 4, "lr": 1e-3}
    job = job_factory(small_model, [sft, kto_stage(small_data["prefs"], desirable_weight=2.0)])
    sft_result, trained = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    records = metrics_of(tmp_path / "work", "kto")
    start = records[0]
    assert start["step"] == 0
    assert start["eval_loss"] == pytest.approx(0.75, abs=1e-6)
    assert start["eval_kl"] == pytest.approx(0.0, abs=1e-6)
    assert start["eval_rewards_desirable"] == pytest.approx(0.0, abs=1e-6)
    assert start["eval_rewards_undesirable"] == pytest.approx(0.0, abs=1e-6)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # The first step's rows are scored before it updates: 0.5 per row, 1.0 for a desirable one, (n_D + 4) / 8.
    assert (train[0]["loss"] * 8) == pytest.approx(round(train[0]["loss"] * 8), abs=1e-5)
    end = records[-1]
    assert end["eval_rewards_desirable"] > end["eval_rewards_undesirable"]
    assert end["eval_loss"] < start["eval_loss"]
    manifest = json.loads((Path(trained.artifact.uri) / "manifest.json").read_text())
    assert manifest["parents"] == [sft_result.artifact.artifact_id]
    assert manifest["stage"]["type"] == "kto"
    assert trained.metrics["steps"] == 3 and trained.metrics["eval_rewards_accuracy"] == end["eval_rewards_accuracy"]


def test_packed_padded_and_precomputed_give_the_same_losses(small_model, small_data, job_factory, tmp_path):
    runs = {"packed": {}, "padded": {"padding_free": False}, "precomputed": {"reference": "precomputed"}}
    losses = {}
    for name, fields in runs.items():
        job = job_factory(small_model, [kto_stage(small_data["prefs"], max_steps=2, **fields)])
        run_job(job, work_root=tmp_path / name, artifact_root=str(tmp_path / "a" / name))
        losses[name] = [(r["step"], r.get("loss"), r.get("eval_loss"), r.get("eval_kl"))
                        for r in metrics_of(tmp_path / name, "kto")]
    assert (tmp_path / "precomputed" / "kto" / "reference_logps.pt").is_file()
    for name in ("padded", "precomputed"):
        assert [step for step, *_ in losses[name]] == [step for step, *_ in losses["packed"]]
        for (step, *expected), (_, *values) in zip(losses["packed"], losses[name]):
            for value, want in zip(values, expected):
                assert (value is None) == (want is None), (name, step)
                assert value is None or value == pytest.approx(want, rel=1e-4, abs=1e-6), (name, step)


@pytest.mark.slow
def test_kto_raises_held_out_accuracy_over_sft(parity_sft):
    """The KTO stage of examples/tiny-sft-kto.yaml from the shared SFT artifact: its step-0 evaluation is the
    SFT policy's greedy accuracy on the desirable held-out rows' prompts, its last one the trained policy's. Its
    replies to the held-out prompts, sampled and scored by `exact_answer`, win against the SFT policy's, which a
    gate with no metric (so on `eval_win_rate`) checks."""
    example, sft_id, root = parity_sft
    stage = yaml.safe_load((REPO / "examples" / "tiny-sft-kto.yaml").read_text())["stages"][1]
    stage.update(eval_reward="exact_answer", max_new_tokens=8, temperature=0.7, gate={"min_delta_vs_parent": 0.05})
    started = time.perf_counter()
    job = parse_spec({**example, "name": "kto", "base_model": f"artifact:{sft_id}", "stages": [stage]})
    (trained,) = run_job(job, work_root=root / "kto", artifact_root=str(root / "artifacts"))
    evals = [r for r in metrics_of(root / "kto", "kto") if "eval_exact_match" in r]
    before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
    print(f"held-out greedy accuracy: sft {before:.3f} -> kto {after:.3f}; reward accuracy "
          f"{evals[-1]['eval_rewards_accuracy']:.3f}; sampled replies' reward {evals[0]['eval_reward_mean']:.3f} -> "
          f"{evals[-1]['eval_reward_mean']:.3f}, win rate {evals[-1]['eval_win_rate']:.3f}; "
          f"{time.perf_counter() - started:.0f} s")
    assert evals[0]["step"] == 0 and 0.4 < before < 0.85, "SFT learns the demonstrations' mistakes"
    assert after >= 0.92 and after >= before + 0.15
    assert evals[-1]["eval_rewards_accuracy"] >= 0.9
    assert trained.artifact.manifest.parents == [sft_id]
    assert evals[0]["eval_win_rate"] == 0.5 and evals[-1]["eval_win_rate"] > 0.6
    assert evals[-1]["eval_reward_mean"] >= evals[0]["eval_reward_mean"] + 0.2
    gate = trained.artifact.manifest.gate
    assert (gate["metric"], gate["passed"]) == ("eval_win_rate", True)
