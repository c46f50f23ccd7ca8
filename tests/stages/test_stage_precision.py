"""Precision in a running stage: what it resolves to and reports, and the gradient norm in every mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.precision import resolve
from align.runner import run_job

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def sft(path: Path, steps: int = 4) -> dict:
    return {"type": "sft", "data": {"path": str(path)}, "batch_size": 4, "max_steps": steps, "lr": 1e-3,
            "checkpoint_every": None, "seed": 3}


def grad_norms(tmp_path: Path, job) -> list[float]:
    run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    records = [json.loads(line) for line in (tmp_path / "work" / "sft" / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in records if "grad_norm" in r]


@pytest.mark.parametrize("precision, zero_stage", [("fp32", 0), ("fp32", 2), ("fp32", 3), ("bf16", 0), ("bf16", 2)])
def test_the_gradient_norm_is_reported_in_every_precision_and_zero_stage(
    precision, zero_stage, small_model, small_data, job_factory, tmp_path
):
    job = job_factory(small_model, [sft(small_data["sft"])],
                      deepspeed={"zero_stage": zero_stage, "precision": precision})
    norms = grad_norms(tmp_path, job)
    assert len(norms) == 4
    assert all(math.isfinite(n) and n > 0 for n in norms), norms


def test_fp32_without_zero_reports_the_norm_zero_2_reports_and_clips_alike(small_model, small_data, job_factory,
                                                                          tmp_path):
    """ZeRO-0 in fp32 steps the bare torch optimizer, so align clips and keeps the norm itself; the unclipped
    norm and the clipped updates must match DeepSpeed's ZeRO-2 optimizer on one rank."""
    clip = {"gradient_clipping": 0.5}
    plain = grad_norms(tmp_path / "z0", job_factory(small_model, [sft(small_data["sft"])],
                                                    deepspeed={"zero_stage": 0, "precision": "fp32", **clip}))
    zero2 = grad_norms(tmp_path / "z2", job_factory(small_model, [sft(small_data["sft"])],
                                                    deepspeed={"zero_stage": 2, "precision": "fp32", **clip}))
    assert plain[0] > 0.5, "the first step must be clipped for this test to mean anything"
    assert plain == pytest.approx(zero2, rel=1e-4)


def test_auto_is_recorded_in_the_first_message_and_the_manifest(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [sft(small_data["sft"], steps=2)], deepspeed={"precision": "auto"})
    messages = []
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"),
                        on_message=lambda stage, text, level: messages.append((stage, text, level)))
    expected = resolve("auto")
    assert messages[0] == ("sft", expected.summary(), "info")
    recorded = result.artifact.manifest.precision
    assert recorded["requested"] == "auto" and recorded["precision"] == expected.precision
    assert recorded["reason"] == expected.reason and recorded["warning"] is None


def test_explicit_bf16_on_a_cpu_without_it_trains_and_warns_with_the_measured_slowdown(small_model, small_data,
                                                                                     tmp_path):
    """``align train`` under torch and oneDNN held to AVX2: the pre-flight and the stage warn, bf16 still runs."""
    spec = {"name": "bf16-on-avx2", "base_model": str(small_model), "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"precision": "bf16"}, "stages": [sft(small_data["sft"], steps=2)]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "services.cli", "train", str(tmp_path / "job.yaml"),
               "--work-dir", str(tmp_path / "work"), "--artifact-root", str(tmp_path / "artifacts")]
    # A fresh process group: not the one this test process may already hold.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(command, env={**env, **AVX2_ENV, "COLUMNS": "400"}, capture_output=True, text=True,
                         check=False, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [line for line in out.stdout.splitlines() if "bf16 was asked for, but bf16 is emulated" in line]
    assert len(warnings) == 2, out.stdout  # the pre-flight, then the stage's own report
    assert "slower than fp32 on this machine" in warnings[1]
    manifest = json.loads(next((tmp_path / "artifacts").glob("*/v1/manifest.json")).read_text())
    assert manifest["precision"]["precision"] == "bf16" and manifest["precision"]["bf16_slowdown"] > 5
