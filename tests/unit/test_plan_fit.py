"""What the planner says of a stage that does not fit: the shortfall, and only remedies that fit when
planned."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from align.plan import GPUS, cpu_device, plan_job
from align.plan_fit import fit_problems
from align.plan_report import show_bytes
from align.spec import parse_spec

LLAMA_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
H100 = GPUS["h100"]


def job(adapter: str = "lora", workers: int = 1, batch_size: int = 16, **deepspeed):
    return parse_spec({
        "name": "j", "base_model": "builtin:tiny", "adapter": {"type": adapter},
        "resources": {"num_workers": workers, "gpus_per_worker": 1},
        "deepspeed": {"precision": "bf16", **deepspeed},
        "stages": [{"type": "sft", "data": {"path": "x"}, "batch_size": batch_size, "max_length": 4096}],
    })


def fits(spec) -> bool:
    return plan_job(spec, LLAMA_7B, H100)[0].fits


def test_a_stage_that_fits_has_no_problem():
    assert fits(job(batch_size=1, gradient_checkpointing=True))
    assert fit_problems(job(batch_size=1, gradient_checkpointing=True), LLAMA_7B, H100) == []


def test_each_remedy_named_fits_and_the_others_do_not():
    """LoRA on a 7B model, 16 sequences of 4096 tokens per micro-batch on one H100: the activations do not
    fit. Checkpointing or a batch of 2 (accumulating 8) fits; QLoRA and offload shrink what is not the
    problem, and a batch of 4 is still too large."""
    spec = job()
    plan = plan_job(spec, LLAMA_7B, H100)[0]
    assert not plan.fits
    ((field, message),) = fit_problems(spec, LLAMA_7B, H100)
    assert field == "stages[0]"
    assert message == (
        f"sft needs about {show_bytes(plan.total)} per rank (align plan), {show_bytes(plan.total - plan.budget)} "
        f"more than the {show_bytes(plan.budget)} of one NVIDIA H100 SXM 80 GB per rank; it would fit with any "
        "of: deepspeed.gradient_checkpointing: true; stages[0].batch_size: 2 with gradient_accumulation_steps: "
        "8 (the same global batch)")
    assert fits(job(gradient_checkpointing=True)) and fits(job(batch_size=2))
    assert not fits(job(batch_size=4)) and not fits(job(offload_optimizer=True, zero_stage=1))
    with_qlora = parse_spec({**spec.model_dump(mode="json"), "quantization": {"bits": 4}})
    assert not fits(with_qlora)


def test_when_no_single_change_fits_a_combination_is_named():
    """Full fine-tuning of 7B on one H100: 16 bytes of model states per parameter alone are over 100 GiB.
    Optimizer offload with gradient checkpointing fits."""
    ((_, message),) = fit_problems(job("full"), LLAMA_7B, H100)
    assert message.endswith("no single change fits it, but these together do: deepspeed.offload_optimizer: "
                            "true (zero_stage 1 or more); deepspeed.gradient_checkpointing: true")
    assert fits(job("full", offload_optimizer=True, zero_stage=1, gradient_checkpointing=True))


def test_nothing_fits_a_machine_smaller_than_the_runtime():
    tiny = parse_spec({"name": "j", "base_model": "builtin:tiny", "stages": [{"type": "sft", "data": {"path": "x"}}]})
    from align.plan_report import load_model_config

    ((_, message),) = fit_problems(tiny, load_model_config("builtin:tiny"), cpu_device(0.25 * 2**30))
    assert "of one rank's share of this machine's 256.0 MiB RAM" in message
    assert message.endswith("do not fit it: ask for more memory per rank (more GPUs, a larger device) or a "
                            "smaller max_length")


@pytest.mark.parametrize("workers", [8])
def test_zero_3_is_offered_only_with_ranks_to_partition_over(workers):
    ((_, one),) = fit_problems(job("full"), LLAMA_7B, H100)
    ((_, eight),) = fit_problems(job("full", workers=workers), LLAMA_7B, H100)
    assert "zero_stage: 3" not in one and "deepspeed.zero_stage: 3" in eight


def test_each_stage_is_planned_on_its_own_resources():
    """An SFT stage on 8 GPUs with ZeRO-3 partitions its full fine-tuning 8 ways; the DPO stage after it,
    on 1, holds all of it: it alone does not fit, and its message names its own remedies."""
    spec = parse_spec({
        "name": "j", "base_model": "builtin:tiny", "adapter": {"type": "full"},
        "resources": {"num_workers": 8, "gpus_per_worker": 1}, "deepspeed": {"precision": "bf16", "zero_stage": 3},
        "stages": [{"type": "sft", "data": {"path": "x"}, "batch_size": 1, "max_length": 1024},
                   {"type": "dpo", "data": {"path": "x"}, "batch_size": 1, "max_length": 1024,
                    "resources": {"num_workers": 1, "gpus_per_worker": 1}}],
    })
    sft, dpo = plan_job(spec, LLAMA_7B, H100)
    assert (sft.world_size, dpo.world_size) == (8, 1)
    assert sft.fits and not dpo.fits
    ((field, message),) = fit_problems(spec, LLAMA_7B, H100)
    assert field == "stages[1]" and message.startswith("dpo needs about")
    assert "zero_stage: 3" not in message, "ZeRO-3 partitions nothing over the stage's one rank"
