"""Evaluation gates through the runner: the gated stage publishes either way, its manifest records the
decision, and a failed gate stops the job before the next stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.artifacts import ArtifactStore
from align.gates import GateFailed
from align.runner import run_job

PAIRS = {"eval_fraction": 0.25}


def stages(small_data, gate: dict) -> list[dict]:
    sft = {"type": "sft", "data": {"path": str(small_data["sft"]), **PAIRS}, "batch_size": 4, "max_steps": 2,
           "lr": 1e-3}
    dpo = {"type": "dpo", "data": {"path": str(small_data["prefs"]), **PAIRS}, "batch_size": 4, "max_steps": 2,
           "lr": 1e-3, "gate": gate}
    return [{**sft, "name": "sft"}, dpo, {**sft, "name": "sft-after"}]


def test_a_passing_gate_lets_the_job_go_on(small_model, small_data, job_factory, tmp_path):
    gate = {"metric": "eval_rewards_accuracy", "min": 0.0, "min_delta_vs_parent": -1.0}
    results = run_job(job_factory(small_model, stages(small_data, gate)), work_root=tmp_path / "work",
                      artifact_root=str(tmp_path / "artifacts"))
    assert len(results) == 3
    decided = results[1].artifact.manifest.gate
    # The parent's value is the DPO stage's own step-0 evaluation of the SFT policy on the same pairs.
    records = [json.loads(line) for line in (tmp_path / "work" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0
    assert decided["baseline"] == records[0]["eval_rewards_accuracy"]
    assert decided["value"] == results[1].metrics["eval_rewards_accuracy"]
    assert decided["passed"] is True
    assert results[0].artifact.manifest.gate is None and results[2].artifact.manifest.gate is None


def test_a_failed_gate_publishes_then_stops_the_job(small_model, small_data, job_factory, tmp_path):
    gate = {"metric": "eval_loss", "max": 1e-6}
    root = tmp_path / "artifacts"
    with pytest.raises(GateFailed) as info:
        run_job(job_factory(small_model, stages(small_data, gate)), work_root=tmp_path / "work",
                artifact_root=str(root))
    failed = info.value
    assert failed.stage == "dpo" and [r.artifact.manifest.stage["name"] for r in failed.results] == ["sft", "dpo"]
    value = failed.results[1].metrics["eval_loss"]
    assert failed.gate == {"metric": "eval_loss", "value": value, "baseline": None, "passed": False,
                           "reason": f"eval_loss {value:.4g} > max 1e-06"}
    stored = ArtifactStore(str(root)).get(f"artifact:{failed.results[1].artifact.artifact_id}")
    assert stored.manifest.gate == failed.gate, "the gated artifact is published with the decision"
    assert (Path(stored.uri) / "adapter_model.safetensors").exists()
    assert not (tmp_path / "work" / "sft-after").exists(), "the stage after a failed gate never starts"
    assert ArtifactStore(str(root)).list_versions("test.sft-after") == []
