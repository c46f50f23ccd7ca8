"""The adapter methods beyond LoRA: rank-stabilised LoRA, PiSSA and OLoRA initialisation, IA3 and bias-only
training (BitFit). Each trains a short SFT stage on the tiny model through ``run_job``, and its artifact reloads
with plain peft (or transformers) to the logits the trained model gave."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import align.stages.artifact
from align.models.load import ModelError
from align.runner import run_job

PROBE = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]])
"""Token ids whose logits the trained model and the reloaded artifact must agree on."""


class Trained:
    """What the stage's model was when it was saved: its logits on :data:`PROBE`, its trainable parameters
    and, for LoRA, the scales of the adapted layers (to 6 decimals)."""

    logits: torch.Tensor
    trainable: dict[str, torch.Tensor]
    scalings: set[float]


@pytest.fixture
def trained(monkeypatch) -> Trained:
    """Records the model a stage saves, as :class:`Trained` (the stages run in this process)."""
    seen = Trained()
    save = align.stages.artifact.save_trainable

    def recording_save(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            seen.logits = model(PROBE).logits.float()
        model.train(was_training)
        seen.trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen.scalings = {round(m.scaling["default"], 6) for m in model.modules()
                         if isinstance(getattr(m, "scaling", None), dict)}
        return save(model, *args, **kwargs)

    monkeypatch.setattr(align.stages.artifact, "save_trainable", recording_save)
    return seen


def sft_stage(path: Path, steps: int = 8, lr: float = 3e-3, **extra) -> dict:
    return {"type": "sft", "data": {"path": str(path)}, "batch_size": 4, "max_steps": steps, "lr": lr, "seed": 3,
            **extra}


def train_losses(work: Path, stage: str = "sft") -> list[float]:
    records = [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def peft_logits(base: Path, artifact: Path) -> torch.Tensor:
    """The artifact loaded the way a user would: plain peft on a freshly loaded, untouched base model."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), artifact).eval()
    with torch.no_grad():
        return model(PROBE).logits.float()


def test_rslora_scales_by_alpha_over_sqrt_r_and_reloads(small_model, small_data, job_factory, tmp_path, trained):
    """r=4, alpha=8: rslora scales the update by 8/sqrt(4) = 4 (plain LoRA: 8/4 = 2)."""
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": True}
    job = job_factory(small_model, [sft_stage(small_data["sft"])], adapter=adapter)
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    assert trained.scalings == {4.0}
    losses = train_losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    folder = Path(result.artifact.uri)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 4 and config["lora_alpha"] == 8
    torch.testing.assert_close(peft_logits(small_model, folder), trained.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_a_plain_lora_adapter_for_the_untouched_base(
    init, small_model, small_data, job_factory, tmp_path, trained
):
    """The trained model is the residual base plus the adapter; the artifact, a rank-2r LoRA adapter with
    init_lora_weights true, on the original base gives the same logits. The base's own output differs, so the
    adapter did not start as a no-op."""
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": init}
    job = job_factory(small_model, [sft_stage(small_data["sft"])], adapter=adapter)
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    losses = train_losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    folder = Path(result.artifact.uri)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    assert config["base_model_name_or_path"] == str(small_model)
    reloaded = peft_logits(small_model, folder)
    torch.testing.assert_close(reloaded, trained.logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(small_model)(PROBE).logits
    assert not torch.allclose(base, reloaded, atol=1e-3)


def test_a_pissa_adapter_and_its_continuation_with_rslora_keep_their_reference(
    small_model, small_data, job_factory, tmp_path, trained
):
    """DPO as the first stage with PiSSA: its reference is the original base (the residual base plus the
    adapter's starting matrices), so the step-0 loss is ln 2; with the residual base alone it would not be.
    The SFT stage after it continues the converted adapter (rank 2r, rslora scale alpha·√2/√(2r) = alpha/√r)."""
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "init": "pissa", "rslora": True}
    dpo = {"type": "dpo", "data": {"path": str(small_data["prefs"]), "eval_fraction": 0.25}, "batch_size": 4,
           "max_steps": 2, "beta": 0.1, "lr": 1e-3}
    job = job_factory(small_model, [dpo, sft_stage(small_data["sft"], steps=2)], adapter=adapter)
    dpo_result, sft_result = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    records = [json.loads(line) for line in (tmp_path / "work" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    configs = [json.loads((Path(r.artifact.uri) / "adapter_config.json").read_text()) for r in (dpo_result, sft_result)]
    assert [(c["r"], c["lora_alpha"], c["init_lora_weights"]) for c in configs] == [(8, 8 * math.sqrt(2), True)] * 2, (
        "DPO's adapter is converted once; SFT continues it as saved")
    assert trained.scalings == {round(8 * math.sqrt(2) / math.sqrt(8), 6)} == {4.0}
    torch.testing.assert_close(peft_logits(small_model, Path(sft_result.artifact.uri)), trained.logits,
                               rtol=1e-4, atol=1e-4)


def test_ia3_trains_only_its_vectors_reloads_merges_and_serves_as_dpo_reference(
    small_model, small_data, job_factory, tmp_path, trained
):
    """IA3 on k_proj, v_proj (their 64 outputs rescaled) and down_proj (its 128 inputs rescaled, feed-forward):
    2 layers x (64 + 64 + 128) = 512 trainable numbers, all ``ia3_l``. The DPO stage after SFT keeps the SFT
    vectors as its frozen reference: step-0 loss ln 2. The exported merge gives the adapter's logits."""
    from align.export import merged_model

    dpo = {"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 4, "max_steps": 2,
           "beta": 0.1, "lr": 1e-2}
    job = job_factory(small_model, [sft_stage(small_data["sft"], lr=3e-2), dpo], adapter={"type": "ia3"})
    sft, preference = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    losses = train_losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    assert all(".ia3_l.default" in name for name in trained.trainable)
    assert sum(p.numel() for p in trained.trainable.values()) == 512
    assert {name.split(".")[-3] for name in trained.trainable} == {"k_proj", "v_proj", "down_proj"}
    records = [json.loads(line) for line in (tmp_path / "work" / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)

    folder = Path(preference.artifact.uri)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["down_proj"]
    reloaded = peft_logits(small_model, folder)
    torch.testing.assert_close(reloaded, trained.logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        merged = merged_model(folder, small_model)(PROBE).logits
    torch.testing.assert_close(merged, reloaded, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(peft_logits(small_model, Path(sft.artifact.uri)), reloaded, atol=1e-5)


def test_ia3_respects_a_target_list(small_model, small_data, job_factory, tmp_path, trained):
    """[q_proj, down_proj]: q_proj rescales its 64 outputs, down_proj its 128 inputs: 2 x 192 = 384."""
    job = job_factory(small_model, [sft_stage(small_data["sft"], steps=2)],
                      adapter={"type": "ia3", "target_modules": ["q_proj", "down_proj"]})
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))
    assert {name.split(".")[-3] for name in trained.trainable} == {"q_proj", "down_proj"}
    assert sum(p.numel() for p in trained.trainable.values()) == 384
    config = json.loads((Path(result.artifact.uri) / "adapter_config.json").read_text())
    assert config["feedforward_modules"] == ["down_proj"]


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory) -> Path:
    """The small model's shape with biases on every attention and MLP projection (as Qwen2's q/k/v have)."""
    from data_helpers import build_small_model

    return build_small_model(tmp_path_factory.mktemp("biased-model"), attention_bias=True, mlp_bias=True)


def test_bias_trains_only_the_biases_and_saves_the_whole_model(biased_model, small_data, job_factory, tmp_path,
                                                              trained):
    """Per layer: q, k, v, o (64 each), gate and up (128 each), down (64): 576 biases, 1152 in 2 layers. The
    artifact is the whole model: transformers loads it; only the biases differ from the base."""
    job = job_factory(biased_model, [sft_stage(small_data["sft"], lr=3e-2)], adapter={"type": "bias"})
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    losses = train_losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    assert all(name.endswith(".bias") for name in trained.trainable)
    assert sum(p.numel() for p in trained.trainable.values()) == 1152
    folder = Path(result.artifact.uri)
    assert result.artifact.manifest.kind == "full"
    assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    reloaded_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded_model(PROBE).logits, trained.logits, rtol=1e-4, atol=1e-4)
    base = dict(AutoModelForCausalLM.from_pretrained(biased_model).named_parameters())
    changed = {n for n, p in reloaded_model.named_parameters() if not torch.equal(p, base[n])}
    assert changed and all(name.endswith(".bias") for name in changed)


def test_bias_on_a_model_without_biases_is_refused_at_stage_start(small_model, small_data, job_factory, tmp_path):
    job = job_factory(small_model, [sft_stage(small_data["sft"], steps=1)], adapter={"type": "bias"})
    with pytest.raises(ModelError, match=r"adapter\.type: 'bias' trains only the bias parameters .* has none"):
        run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))


@pytest.mark.parametrize("rslora", [False, True])
def test_the_pissa_conversion_matches_peft_s_own(rslora, small_model, tmp_path):
    """:func:`lora_from_mutated_init` against peft's ``save_pretrained(path_initial_model_for_weight_conversion=)``
    (whose starting adapter must be saved before training with ``init_lora_weights`` true): the same tensors and
    the same rank and alpha, after the adapter moved away from its start."""
    from safetensors.torch import load_file

    from align.models.adapters import apply_adapter, save_trainable
    from align.spec import AdapterSpec

    torch.manual_seed(0)
    spec = AdapterSpec(type="lora", r=2, alpha=4, dropout=0.0, init="pissa", rslora=rslora,
                       target_modules=["q_proj", "down_proj"])
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(small_model), spec, task_type="CAUSAL_LM",
                          quantized=False)
    config = model.peft_config["default"]
    config.init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    config.init_lora_weights = "pissa_niter_4"
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn_like(param))

    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    save_trainable(model, tmp_path / "ours", zero_stage=0, write=True)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys() and len(ours) == 8
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert ours[key] == theirs[key], key
