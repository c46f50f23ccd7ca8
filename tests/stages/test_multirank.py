"""Stages on 2 ranks under torchrun (gloo on CPU): ZeRO-2 and ZeRO-3 agree across ranks and with the artifact.

Each rank runs ``rank_report.py``, which trains the stage and reports a digest of its trainable
parameters (gathered under ZeRO-3) just before the artifact is published.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rank_report import tensors_digest
from safetensors.torch import load_file

from align.artifacts import ArtifactStore
from align.engine.dist import free_port
from align.precision import resolve
from align.spec import parse_spec
from align.stage_launch import StageLaunch

pytestmark = pytest.mark.slow

RANK_REPORT = Path(__file__).with_name("rank_report.py")
PRECISION = resolve("auto").precision
"""What users get here: bf16 where the CPU computes in it, fp32 where bf16 would be emulated."""
# Step-0 DPO loss is ln 2 up to the precision's rounding of the summed log-probs.
LN2_TOLERANCE = {"bf16": 1e-4, "fp32": 1e-6}[PRECISION]
SFT_STEPS = 4


def two_rank_job(model: Path, data: dict[str, Path], zero_stage: int):
    """SFT then DPO on 2 ranks of 1 CPU each; the DPO stage continues the SFT adapter."""
    return parse_spec(
        {
            "name": "multirank",
            "base_model": str(model),
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"zero_stage": zero_stage, "precision": PRECISION},
            "resources": {"num_workers": 2, "cpus_per_worker": 1},
            "stages": [
                {"type": "sft", "data": {"path": str(data["sft"]), "eval_fraction": 0.25}, "batch_size": 2,
                 "max_steps": SFT_STEPS, "lr": 1e-3, "seed": 7},
                {"type": "dpo", "data": {"path": str(data["prefs"]), "eval_fraction": 0.25}, "batch_size": 2,
                 "max_steps": 2, "lr": 1e-3, "beta": 0.1, "seed": 7},
            ],
        }
    )


def run_ranks(launch: StageLaunch, out_dir: Path, nproc: int = 2) -> list[dict]:
    """Run the stage as ``nproc`` torchrun ranks of ``rank_report.py``; returns the reports, rank 0 first."""
    launch.work_dir.mkdir(parents=True, exist_ok=True)
    context_file = launch.work_dir / "launch.json"
    context_file.write_text(launch.model_dump_json())
    env = dict(os.environ, OMP_NUM_THREADS=str(launch.threads))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(RANK_REPORT), str(context_file), str(out_dir),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return [json.loads((out_dir / f"rank-{r}.json").read_text()) for r in range(nproc)]


def shared_metrics(report: dict) -> dict:
    """The report's final metrics without throughput, which each rank times on its own clock."""
    return {k: v for k, v in report["metrics"].items() if k != "tokens_per_s"}


def metrics_of(work_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_runs(small_model, small_data, tmp_path_factory):
    """``sft_runs(zero_stage)``: (context, rank reports) of the 2-rank SFT stage, run once per module."""
    runs: dict[int, tuple[StageLaunch, list[dict]]] = {}

    def run(zero_stage: int):
        if zero_stage not in runs:
            root = tmp_path_factory.mktemp(f"zero{zero_stage}")
            job = two_rank_job(small_model, small_data, zero_stage)
            ctx = StageLaunch(spec=job, index=0, work_dir=root / "work" / "sft", artifact_root=str(root / "artifacts"))
            runs[zero_stage] = (ctx, run_ranks(ctx, root / "reports" / "sft"))
        return runs[zero_stage]

    return run


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_ranks_end_with_identical_adapters(sft_runs, small_model, zero_stage):
    ctx, (rank0, rank1) = sft_runs(zero_stage)

    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["tensors"] and all("lora_" in name for name in rank0["tensors"])
    assert rank0["tensors"] == rank1["tensors"]
    assert rank0["digest"] == rank1["digest"], "the ranks disagree on the trained adapter"
    assert shared_metrics(rank0) == shared_metrics(rank1)
    assert rank0["artifact"] == rank1["artifact"]

    records = metrics_of(ctx.work_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == SFT_STEPS
    assert all(math.isfinite(loss) for loss in losses)
    assert rank0["metrics"]["loss"] == losses[-1]

    # What rank 0 published is what the ranks trained, and peft loads it back unchanged.
    folder = Path(rank0["artifact"])
    ArtifactStore(ctx.artifact_root).verify(rank0["artifact"])
    saved = load_file(folder / "adapter_model.safetensors")
    assert sorted(saved) == rank0["tensors"]
    assert tensors_digest(saved) == rank0["digest"]

    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, folder)
    assert tensors_digest(get_peft_model_state_dict(loaded)) == rank0["digest"]
    assert any(t.abs().sum() > 0 for name, t in saved.items() if "lora_B" in name), "the adapter never moved"

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["steps"] == SFT_STEPS
    assert manifest["metrics"]["loss"] == rank0["metrics"]["loss"]
    assert math.isfinite(manifest["metrics"]["eval_loss"])
    assert math.isfinite(manifest["metrics"]["tokens_per_s"]) and manifest["metrics"]["tokens_per_s"] > 0


def test_dpo_on_two_ranks_starts_at_ln2_from_the_sft_adapter(sft_runs, tmp_path):
    sft_ctx, (sft_rank0, _) = sft_runs(2)
    store = ArtifactStore(sft_ctx.artifact_root)
    sft_artifact = store.get(sft_rank0["artifact"])
    ctx = StageLaunch(spec=sft_ctx.spec, index=1, work_dir=sft_ctx.work_dir.parent / "dpo",
                      artifact_root=sft_ctx.artifact_root, start_policy=sft_artifact.uri,
                      parents=[sft_artifact.artifact_id])
    rank0, rank1 = run_ranks(ctx, tmp_path / "reports")

    assert rank0["digest"] == rank1["digest"], "the ranks disagree on the trained adapter"
    assert shared_metrics(rank0) == shared_metrics(rank1)
    # The frozen reference copy of the SFT adapter is not part of what trains or what is saved.
    assert rank0["tensors"] == sft_rank0["tensors"]
    assert rank0["digest"] != sft_rank0["digest"]

    records = metrics_of(ctx.work_dir)
    assert records[0]["step"] == 0 and "loss" not in records[0]
    assert records[0]["eval_loss"] == pytest.approx(math.log(2), abs=LN2_TOLERANCE)
    first = next(r for r in records if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=LN2_TOLERANCE)
    assert first["rewards_margin"] == pytest.approx(0.0, abs=LN2_TOLERANCE)

    folder = Path(rank0["artifact"])
    assert tensors_digest(load_file(folder / "adapter_model.safetensors")) == rank0["digest"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["parents"] == [sft_artifact.artifact_id]
    assert math.isfinite(manifest["metrics"]["loss"]) and manifest["metrics"]["steps"] == 2


def test_kto_on_two_ranks_ends_with_one_policy_from_the_sft_adapter(sft_runs, small_data, tmp_path):
    """KTO's reference point is the KL estimate averaged over the ranks, so both ranks take the same loss. At
    step 0 the policy is its reference (the frozen SFT adapter): every row's loss is 1 - σ(0) = 0.5."""
    sft_ctx, (sft_rank0, _) = sft_runs(2)
    sft_artifact = ArtifactStore(sft_ctx.artifact_root).get(sft_rank0["artifact"])
    spec = sft_ctx.spec.model_dump(mode="json")
    spec["stages"][1] = {"type": "kto", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25},
                         "batch_size": 2, "max_steps": 2, "lr": 1e-3, "seed": 7}
    ctx = StageLaunch(spec=parse_spec(spec), index=1, work_dir=sft_ctx.work_dir.parent / "kto",
                      artifact_root=sft_ctx.artifact_root, start_policy=sft_artifact.uri,
                      parents=[sft_artifact.artifact_id])
    rank0, rank1 = run_ranks(ctx, tmp_path / "reports")

    assert rank0["digest"] == rank1["digest"], "the ranks disagree on the trained adapter"
    assert shared_metrics(rank0) == shared_metrics(rank1)
    assert rank0["digest"] != sft_rank0["digest"]
    records = metrics_of(ctx.work_dir)
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(0.5, abs=1e-4)
    assert records[0]["eval_kl"] == pytest.approx(0.0, abs=1e-4)
    assert json.loads((Path(rank0["artifact"]) / "manifest.json").read_text())["parents"] == [
        sft_artifact.artifact_id]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_ppo_on_two_ranks_ends_with_one_policy(small_model, small_data, tmp_path, zero_stage):
    """Each rank samples and scores its share of the prompts; advantages are whitened over both;
    DeepSpeed averages the gradients, so both ranks end with the same policy (and the same critic).
    Under ZeRO-3 every forward gathers parameters from both ranks, so the ranks sample in step."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {n} and {n % 7}"}) + "\n" for n in range(32)))
    spec = {
        "name": "multirank-ppo",
        "base_model": str(small_model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": zero_stage, "precision": PRECISION},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "stages": [
            {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
            {"type": "rm", "data": {"path": str(small_data["prefs"])}, "batch_size": 4, "max_steps": 2, "lr": 1e-3},
            {"type": "ppo", "data": {"path": str(prompts), "eval_fraction": 0.25}, "batch_size": 2,
             "max_new_tokens": 4, "max_length": 48, "max_steps": 2, "ppo_epochs": 2, "lr": 1e-2, "seed": 3},
        ],
    }
    from align.runner import run_job

    sft, rm = run_job(parse_spec({**spec, "stages": spec["stages"][:2]}), work_root=tmp_path / "work",
                      artifact_root=str(tmp_path / "artifacts"))
    # The PPO stage's own resources: 2 ranks, where SFT and the reward model trained on the job's one.
    spec["stages"][2]["resources"] = {"num_workers": 2, "cpus_per_worker": 1}
    job = parse_spec(spec)
    assert job.stage_resources(2).num_workers == 2 and job.stage_resources(0).num_workers == 1
    ctx = StageLaunch(spec=job, index=2, work_dir=tmp_path / "work" / "ppo", artifact_root=str(tmp_path / "artifacts"),
                      start_policy=sft.artifact.uri, reward_model=rm.artifact.uri,
                      parents=[sft.artifact.artifact_id, rm.artifact.artifact_id])
    rank0, rank1 = run_ranks(ctx, tmp_path / "reports")

    assert rank0["digest"] == rank1["digest"], "the ranks disagree on the trained policy"
    assert {k: v for k, v in rank0["metrics"].items() if "per_s" not in k} == {
        k: v for k, v in rank1["metrics"].items() if "per_s" not in k
    }
    first = next(r for r in metrics_of(ctx.work_dir) if r.get("step") == 1 and "policy_loss" in r)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["first_pass_ratio"] == pytest.approx(1.0, abs=1e-6)
    manifest = json.loads((Path(rank0["artifact"]) / "manifest.json").read_text())
    assert manifest["parents"] == [sft.artifact.artifact_id, rm.artifact.artifact_id]
    assert tensors_digest(load_file(Path(rank0["artifact"]) / "adapter_model.safetensors")) == rank0["digest"]
    assert [r["step"] for r in metrics_of(ctx.work_dir) if "eval_reward_mean" in r] == [0, 2]


def test_grpo_on_two_ranks_with_zero3(small_model, small_data, tmp_path):
    """GRPO's shared-prompt passes and synced sampling under ZeRO-3 on 2 ranks: one policy."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {n} and {n % 7}"}) + "\n" for n in range(16)))
    job = parse_spec({
        "name": "multirank-grpo",
        "base_model": str(small_model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 3, "precision": PRECISION},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
        "stages": [{"type": "grpo", "data": {"path": str(prompts), "eval_fraction": 0.25}, "reward": "exact_answer",
                    "group_size": 3, "batch_size": 2, "max_new_tokens": 6, "max_length": 48, "max_steps": 2,
                    "lr": 1e-2, "seed": 5}],
    })
    ctx = StageLaunch(spec=job, index=0, work_dir=tmp_path / "work" / "grpo", artifact_root=str(tmp_path / "artifacts"))
    rank0, rank1 = run_ranks(ctx, tmp_path / "reports")

    assert rank0["digest"] == rank1["digest"], "the ranks disagree on the trained policy"
    records = [r for r in metrics_of(ctx.work_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6) and records[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert [r["step"] for r in metrics_of(ctx.work_dir) if "eval_exact_match" in r] == [0, 2]
