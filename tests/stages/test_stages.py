"""Stage behaviour on a small model in one process: numbers, resume, accumulation, artifacts."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.artifacts import ArtifactStore, sha256_file
from align.runner import run_job
from align.stages.context import StageContext
from align.stages.loop import MissingCheckpoint


def metrics_of(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def train_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def adapter_digest(artifact_dir: Path) -> str:
    tensors = load_file(artifact_dir / "adapter_model.safetensors")
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


def sft_stage(path: Path, **extra) -> dict:
    stage = {"type": "sft", "data": {"path": str(path)}, "batch_size": 4, "max_steps": 6, "lr": 1e-3,
             "checkpoint_every": 3, "seed": 7}
    stage.update(extra)
    return stage


class StopAt(Exception):
    pass


def test_sft_artifact_file_set_and_manifest(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [sft_stage(small_data["sft"], data={"path": str(small_data["sft"]),
                                                                         "eval_fraction": 0.25})])
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    folder = Path(result.artifact.uri)
    assert folder == tmp_path / "artifacts" / "test.sft" / "v1"
    files = {p.name for p in folder.iterdir()}
    assert files == {
        "adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "metrics.jsonl", "manifest.json",
    }
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == files - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(folder / name)
    assert manifest["base_model"] == str(small_model)
    assert manifest["spec_hash"] == job.hash()
    assert manifest["stage"] == {"type": "sft", "index": 0, "name": "sft"}
    assert manifest["data_fingerprints"]["train"].startswith("sha256:")
    assert manifest["metrics"]["steps"] == 6
    assert math.isfinite(manifest["metrics"]["eval_loss"])
    ArtifactStore(str(tmp_path / "artifacts")).verify(result.artifact.uri)

    # The adapter loads back with peft and changes the model's output.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, folder)
    assert not torch.allclose(tuned(ids).logits, before)


def test_full_fine_tuning_loss_falls_and_saves_full_weights(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [sft_stage(small_data["sft"], max_steps=20, lr=3e-3)], adapter={"type": "full"})
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    losses = train_losses(metrics_of(tmp_path / "work", "sft"))
    assert len(losses) == 20
    assert losses[-1] < 0.6 * losses[0]
    assert result.artifact.manifest.kind == "full"
    assert (Path(result.artifact.uri) / "model.safetensors").is_file()


def test_accumulation_8x1_equals_2x4(small_model, small_data, job_factory, tmp_path):
    """Token-weighted loss over the optimizer step: same loss and same update for 8x1 and 2x4."""
    results = {}
    for batch, accumulation in [(8, 1), (2, 4)]:
        job = job_factory(small_model, [sft_stage(small_data["sft"], batch_size=batch,
                                                  gradient_accumulation_steps=accumulation, max_steps=3)])
        work = tmp_path / f"{batch}x{accumulation}"
        (result,) = run_job(job, work_root=work, artifact_root=str(tmp_path / f"a{batch}"))
        results[(batch, accumulation)] = (train_losses(metrics_of(work, "sft")), Path(result.artifact.uri))
    (losses_a, dir_a), (losses_b, dir_b) = results.values()
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    a, b = load_file(dir_a / "adapter_model.safetensors"), load_file(dir_b / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_packed_and_padded_batches_train_alike(small_model, small_data, job_factory, tmp_path):
    """SFT then DPO with padding-free batches (the default; here also through gradient checkpointing) and
    with padded ones: the same first-step losses and gradient norms, and losses that stay together."""
    runs = {}
    for padding_free, checkpointing in [(True, True), (False, False)]:
        job = job_factory(
            small_model,
            [sft_stage(small_data["sft"], max_steps=3, checkpoint_every=None, padding_free=padding_free),
             {"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 4, "max_steps": 3,
              "lr": 1e-3, "checkpoint_every": None, "padding_free": padding_free}],
            deepspeed={"zero_stage": 0, "precision": "fp32", "gradient_checkpointing": checkpointing},
        )
        work = tmp_path / f"packed-{padding_free}"
        run_job(job, work_root=work, artifact_root=str(tmp_path / f"a-{padding_free}"))
        runs[padding_free] = {stage: [r for r in metrics_of(work, stage) if "loss" in r] for stage in ("sft", "dpo")}
    for stage in ("sft", "dpo"):
        packed, padded = runs[True][stage], runs[False][stage]
        assert packed[0]["loss"] == pytest.approx(padded[0]["loss"], rel=1e-5), stage
        assert packed[0]["grad_norm"] == pytest.approx(padded[0]["grad_norm"], rel=1e-4), stage
        assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], rel=2e-3), stage
    assert runs[True]["dpo"][0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_resume_reproduces_uninterrupted_run(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [sft_stage(small_data["sft"], max_steps=7, checkpoint_every=3)],
                      adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    (straight,) = run_job(job, work_root=tmp_path / "straight", artifact_root=str(tmp_path / "a1"))

    def crash_after_step_5(stage, record):
        if record.get("step") == 5 and "loss" in record:
            raise StopAt()

    with pytest.raises(StopAt):
        run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"), on_metrics=crash_after_step_5)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "sft" / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003"]
    (resumed,) = run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"))

    straight_losses = train_losses(metrics_of(tmp_path / "straight", "sft"))
    assert train_losses(metrics_of(tmp_path / "resumed", "sft")) == straight_losses
    assert adapter_digest(Path(resumed.artifact.uri)) == adapter_digest(Path(straight.artifact.uri))


def test_retry_without_checkpoint_is_an_error(small_model, small_data, job_factory, tmp_path):
    from align.runner import run_stage

    job = job_factory(small_model, [sft_stage(small_data["sft"])])
    ctx = StageContext(job=job, index=0, work_dir=tmp_path / "w", artifact_root=str(tmp_path / "a"),
                       require_checkpoint=True)
    with pytest.raises(MissingCheckpoint, match="expected a checkpoint"):
        run_stage(ctx)


def test_dpo_step0_loss_is_ln2_and_reference_is_the_sft_policy(small_model, small_data, job_factory, tmp_path):
    job = job_factory(
        small_model,
        [
            sft_stage(small_data["sft"], max_steps=4),
            {"type": "dpo", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25}, "batch_size": 4,
             "max_steps": 3, "beta": 0.1, "lr": 1e-3},
        ],
    )
    sft, dpo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    records = metrics_of(tmp_path / "work", "dpo")
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    first = next(r for r in records if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards_margin"] == pytest.approx(0.0, abs=1e-6)
    assert train_losses(records)[-1] < math.log(2)
    # The DPO adapter continues the SFT adapter; its manifest names SFT as parent.
    manifest = json.loads((Path(dpo.artifact.uri) / "manifest.json").read_text())
    assert manifest["parents"] == [sft.artifact.artifact_id]
    assert adapter_digest(Path(dpo.artifact.uri)) != adapter_digest(Path(sft.artifact.uri))


def test_dpo_precomputed_reference_matches_live(small_model, small_data, job_factory, tmp_path):
    """Also: with an NLL term (RPO) ``loss`` is ``dpo_loss + sft_weight * nll_loss`` in training and in
    evaluation alike, and the preference part starts at ln 2."""
    losses = {}
    for mode in ("live", "precomputed"):
        data = {"path": str(small_data["prefs"]), "eval_fraction": 0.25}
        job = job_factory(small_model, [{"type": "dpo", "data": data, "batch_size": 4, "max_steps": 3, "lr": 1e-3,
                                         "reference": mode, "sft_weight": 0.5}])
        run_job(job, work_root=tmp_path / mode, artifact_root=str(tmp_path / "a" / mode))
        records = metrics_of(tmp_path / mode, "dpo")
        losses[mode] = train_losses(records)
        for prefix in ("", "eval_"):
            parts = [r for r in records if prefix + "loss" in r]
            assert parts, prefix
            for r in parts:
                total = r[prefix + "dpo_loss"] + 0.5 * r[prefix + "nll_loss"]
                assert r[prefix + "loss"] == pytest.approx(total, rel=1e-6), (prefix, r["step"])
        assert records[0]["step"] == 0 and records[0]["eval_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["live"] == pytest.approx(losses["precomputed"], abs=1e-5)


def test_full_fine_tuning_dpo_resumes_with_its_precomputed_reference(small_model, small_data, job_factory, tmp_path):
    """Full fine-tuning has no frozen reference to run, so both splits' reference log-probs are computed
    once before training: the held-out loss starts at ln 2, and a resumed run reuses them to the bit."""
    job = job_factory(small_model, [{"type": "dpo", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25},
                                     "batch_size": 4, "max_steps": 4, "checkpoint_every": 2, "lr": 1e-3}],
                      adapter={"type": "full"})
    (straight,) = run_job(job, work_root=tmp_path / "straight", artifact_root=str(tmp_path / "a1"))
    records = metrics_of(tmp_path / "straight", "dpo")
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)

    def crash_after_step_3(stage, record):
        if record.get("step") == 3 and "loss" in record:
            raise StopAt()

    with pytest.raises(StopAt):
        run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"), on_metrics=crash_after_step_3)
    (resumed,) = run_job(job, work_root=tmp_path / "resumed", artifact_root=str(tmp_path / "a2"))

    assert train_losses(metrics_of(tmp_path / "resumed", "dpo")) == train_losses(records)
    straight_weights = load_file(Path(straight.artifact.uri) / "model.safetensors")
    resumed_weights = load_file(Path(resumed.artifact.uri) / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_dpo_ipo_starts_at_its_target_margin(small_model, small_data, job_factory, tmp_path):
    """IPO's loss is (h̄ - 1/(2β))² on length-averaged log-ratios: 1 at step 0 with β = 0.5, where the
    policy is its reference (h̄ = 0); the first update moves h̄ towards 1/(2β)."""
    job = job_factory(small_model, [{"type": "dpo", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25},
                                     "batch_size": 4, "max_steps": 2, "lr": 1e-3, "beta": 0.5, "loss": "ipo"}])
    run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    records = metrics_of(tmp_path / "work", "dpo")
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(1.0, abs=1e-6)
    losses = train_losses(records)
    assert losses[0] == pytest.approx(1.0, abs=1e-6)
    assert losses[-1] < losses[0]


def test_reward_model_learns_pairs(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [{"type": "rm", "data": {"path": str(small_data["prefs"])}, "batch_size": 8,
                                     "max_steps": 30, "lr": 3e-3, "init": "base"}])
    (rm,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    losses = train_losses(metrics_of(tmp_path / "work", "rm"))
    assert losses[0] == pytest.approx(math.log(2), abs=0.05)
    assert losses[-1] < 0.5
    assert rm.artifact.manifest.kind == "reward_model"
    saved = load_file(Path(rm.artifact.uri) / "adapter_model.safetensors")
    assert any("score" in name for name in saved), "the reward head is saved with the adapter"


def test_bad_rows_fail_before_training_and_name_file_row_column(small_model, small_data, job_factory, tmp_path):
    from align.data.load import DataError

    bad = tmp_path / "prefs.jsonl"
    rows = [json.loads(line) for line in small_data["prefs"].read_text().splitlines()[:10]]
    rows[6]["chosen"] = None
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = job_factory(small_model, [sft_stage(small_data["sft"]), {"type": "dpo", "data": {"path": str(bad)}}])
    with pytest.raises(DataError) as info:
        run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    assert "prefs.jsonl" in str(info.value) and "row 6" in str(info.value) and "'chosen'" in str(info.value)
    assert not (tmp_path / "work").exists(), "the SFT stage must not run when the DPO data is bad"
    assert not (tmp_path / "artifacts").exists()


def test_sft_data_in_a_dpo_stage_names_the_missing_columns(small_model, small_data, job_factory, tmp_path):
    from align.data.load import DataError

    job = job_factory(small_model, [{"type": "dpo", "data": {"path": str(small_data["sft"])}, "max_steps": 2}])
    with pytest.raises(DataError, match="chosen"):
        run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))


def test_file_urls_read_as_paths_and_missing_artifact_bases_are_refused(small_model, small_data, tmp_path):
    from align.data.stage_data import resolve_data_path
    from align.models.load import ModelError, resolve_base_model

    assert resolve_data_path(f"file://{small_data['sft']}") == small_data["sft"]
    assert resolve_base_model(f"file://{small_model}") == small_model
    with pytest.raises(ModelError, match="base_model: 'artifact:x-v1-0123456789ab': no artifact"):
        resolve_base_model("artifact:x-v1-0123456789ab", artifact_root=str(tmp_path))
