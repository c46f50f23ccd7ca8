"""QLoRA on CPU: 4-bit NF4 base weights with a LoRA adapter train, and a no-grad eval pass leaves gradients intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.models.adapters import apply_adapter
from align.models.load import disable_bnb_cpu_inference_repack, load_causal_lm
from align.runner import run_job
from align.spec import AdapterSpec, QuantizationSpec

pytest.importorskip("bitsandbytes")

NF4 = QuantizationSpec(bits=4, type="nf4", double_quant=True)


def lora_gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def quantized_lora(small_model: Path):
    torch.manual_seed(0)
    model = load_causal_lm(small_model, torch.bfloat16, NF4)
    spec = AdapterSpec(type="lora", r=4, alpha=8, dropout=0.0)
    model = apply_adapter(model, spec, task_type="CAUSAL_LM", quantized=True)
    # Non-zero B so that gradients reach the A matrices too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model


def test_qlora_gradients_unchanged_after_no_grad_eval_pass(small_model):
    """A no-grad eval() pass (a reference pass, generate) must not change later LoRA gradients."""
    model = quantized_lora(small_model)
    assert disable_bnb_cpu_inference_repack(model) > 0, "the model has 4-bit layers"
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    before = lora_gradients(model, ids)

    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = lora_gradients(model, ids)

    assert before.keys() == after.keys() and len(before) > 0
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-3, atol=1e-6, msg=name)


def test_qlora_dpo_after_sft_trains(small_model, small_data, job_factory, tmp_path):
    """SFT then DPO on an NF4 base: SFT loss falls, DPO starts at ln 2 and its loss falls."""
    job = job_factory(
        small_model,
        [
            {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 8, "max_steps": 20,
             "lr": 1e-2, "seed": 3},
            {"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 8, "max_steps": 6,
             "lr": 3e-3, "beta": 0.1, "seed": 3},
        ],
        quantization={"bits": 4, "type": "nf4", "double_quant": True},
        deepspeed={"zero_stage": 0, "precision": "auto"},
    )
    _sft, dpo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    def losses(stage: str) -> list[float]:
        lines = (tmp_path / "work" / stage / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    sft_losses, dpo_losses = losses("sft"), losses("dpo")
    assert sum(sft_losses[-5:]) / 5 < 0.9 * sft_losses[0]
    assert dpo_losses[0] == pytest.approx(0.6931, abs=2e-3)
    assert dpo_losses[-1] < dpo_losses[0] - 0.02
    assert json.loads((Path(dpo.artifact.uri) / "adapter_config.json").read_text())["r"] == 4


def test_qlora_ppo_after_sft_and_rm_starts_at_the_reference(small_model, small_data, job_factory, tmp_path):
    """SFT, RM and PPO on an NF4 base: policy, reference, critic and reward model all sit on 4-bit
    bodies; policy and reference share theirs, so at the first step the KL is 0 and the ratio 1."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"add {n} and {n % 7}"}) + "\n" for n in range(16)))
    job = job_factory(
        small_model,
        [
            {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 8, "max_steps": 2, "lr": 1e-2},
            {"type": "rm", "data": {"path": str(small_data["prefs"])}, "batch_size": 8, "max_steps": 2, "lr": 1e-2},
            {"type": "ppo", "data": {"path": str(prompts)}, "batch_size": 4, "max_new_tokens": 4, "max_length": 48,
             "max_steps": 2, "ppo_epochs": 2, "lr": 1e-2, "critic_lr": 1e-2},
        ],
        quantization={"bits": 4, "type": "nf4", "double_quant": True},
        deepspeed={"zero_stage": 0, "precision": "auto"},
    )
    sft, rm, ppo = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    lines = (tmp_path / "work" / "ppo" / "metrics.jsonl").read_text().splitlines()
    first, second = [r for r in map(json.loads, lines) if "policy_loss" in r]
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["first_pass_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["reward_std"] > 0 and second["kl"] != 0.0
    assert json.loads((Path(ppo.artifact.uri) / "manifest.json").read_text())["parents"] == [
        sft.artifact.artifact_id, rm.artifact.artifact_id,
    ]
