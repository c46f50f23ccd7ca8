"""The ORPO and SimPO stages: what they log adds up, packed and padded batches train alike, they continue the
SFT adapter, and on the built-in parity task each raises held-out greedy accuracy over the SFT policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from align.runner import run_job
from align.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]

PAIRS = {"eval_fraction": 0.25}


def metrics_of(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def sft_stage(path: Path) -> dict:
    return {"type": "sft", "data": {"path": str(path)}, "batch_size": 4, "max_steps": 4, "lr": 1e-3}


@pytest.mark.parametrize(("stage", "total"), [
    ({"type": "orpo", "beta": 0.5}, lambda r, p: r[p + "nll_loss"] + 0.5 * r[p + "odds_ratio_loss"]),
    ({"type": "simpo", "beta": 2.0, "gamma": 0.5, "sft_weight": 0.5},
     lambda r, p: r[p + "simpo_loss"] + 0.5 * r[p + "nll_loss"]),
], ids=["orpo", "simpo"])
def test_the_logged_loss_is_its_parts_and_the_stage_continues_the_sft_adapter(
    stage, total, small_model, small_data, job_factory, tmp_path
):
    pairs = {**stage, "data": {"path": str(small_data["prefs"]), **PAIRS}, "batch_size": 4, "max_steps": 3,
             "lr": 1e-3}
    job = job_factory(small_model, [sft_stage(small_data["sft"]), pairs])
    sft, trained = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    records = metrics_of(tmp_path / "work", stage["type"])
    assert records[0]["step"] == 0 and "eval_loss" in records[0], "the starting policy is evaluated first"
    for prefix in ("", "eval_"):
        logged = [r for r in records if prefix + "loss" in r]
        assert len(logged) == (3 if prefix == "" else 2)
        for r in logged:
            assert r[prefix + "loss"] == pytest.approx(total(r, prefix), rel=1e-6), (prefix, r["step"])
            margin = r[prefix + "rewards_chosen"] - r[prefix + "rewards_rejected"]
            assert r[prefix + "rewards_margin"] == pytest.approx(margin, abs=1e-6)
            assert 0.0 <= r[prefix + "rewards_accuracy"] <= 1.0
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < train[0]
    manifest = json.loads((Path(trained.artifact.uri) / "manifest.json").read_text())
    assert manifest["parents"] == [sft.artifact.artifact_id]
    assert manifest["stage"]["type"] == stage["type"]
    assert trained.metrics["steps"] == 3 and "eval_logp_accuracy" in trained.metrics


def test_packed_and_padded_pairs_give_the_same_losses(small_model, small_data, job_factory, tmp_path):
    losses = {}
    for padding_free in (True, False):
        stage = {"type": "simpo", "data": {"path": str(small_data["prefs"]), **PAIRS}, "batch_size": 4,
                 "max_steps": 2, "lr": 1e-3, "padding_free": padding_free}
        run_job(job_factory(small_model, [stage]), work_root=tmp_path / str(padding_free),
                artifact_root=str(tmp_path / "a" / str(padding_free)))
        records = metrics_of(tmp_path / str(padding_free), "simpo")
        losses[padding_free] = [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records]
    assert [step for step, *_ in losses[True]] == [step for step, *_ in losses[False]]
    for (step, *packed), (_, *padded) in zip(losses[True], losses[False]):
        for value, padded_value in zip(packed, padded):
            # The step-0 record holds only the starting policy's evaluation; training steps hold a loss.
            assert (value is None) == (padded_value is None), step
            assert value is None or value == pytest.approx(padded_value, rel=1e-4), step


# --- on the built-in task ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("example_file", ["tiny-sft-orpo.yaml", "tiny-sft-simpo.yaml"])
def test_a_reference_free_stage_raises_held_out_accuracy_over_sft(example_file, parity_sft):
    """The second stage of the example, started from the shared SFT artifact: its step-0 evaluation is the
    SFT policy's, its last one the trained policy's."""
    example, sft_id, root = parity_sft
    stage = yaml.safe_load((REPO / "examples" / example_file).read_text())["stages"][1]
    started = time.perf_counter()
    job = parse_spec({**example, "name": stage["type"], "base_model": f"artifact:{sft_id}", "stages": [stage]})
    (trained,) = run_job(job, work_root=root / stage["type"], artifact_root=str(root / "artifacts"))
    evals = [r for r in metrics_of(root / stage["type"], stage["type"]) if "eval_exact_match" in r]
    before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
    print(f"held-out greedy accuracy: sft {before:.3f} -> {stage['type']} {after:.3f}; reward accuracy "
          f"{evals[-1]['eval_rewards_accuracy']:.3f}; {time.perf_counter() - started:.0f} s")
    assert evals[0]["step"] == 0 and 0.4 < before < 0.85, "SFT learns the demonstrations' mistakes"
    assert after >= 0.92 and after >= before + 0.15
    assert evals[-1]["eval_rewards_accuracy"] >= 0.95
    assert trained.artifact.manifest.parents == [sft_id]
