"""Prefix tuning and prompt tuning (peft's prompt learning): virtual tokens in front of every sequence. Each
trains on the tiny model through ``run_job`` on padded batches (the stages fall back from packing and say
so), its artifact reloads with plain peft to the logits the trained model gave, greedy generation places the
virtual tokens as the forward does, and what cannot work with them is refused, naming the field and the fix."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from test_adapter_methods import PROBE, peft_logits, sft_stage, train_losses, trained  # noqa: F401 (fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer

from align.runner import run_job

VIRTUAL = 4
"""Virtual tokens of every adapter here."""


def run(job, tmp_path: Path) -> tuple[list, list[tuple[str, str, str]]]:
    messages: list[tuple[str, str, str]] = []
    results = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"),
                      on_message=lambda stage, text, level: messages.append((stage, text, level)))
    return results, messages


def metrics(work: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (work / stage / "metrics.jsonl").read_text().splitlines()]


def test_prefix_tuning_sft_pads_trains_the_prefix_reloads_with_peft_and_refuses_a_merge(
    small_model, small_data, job_factory, tmp_path, trained  # noqa: F811
):
    """4 virtual tokens x 2 layers x (a key and a value of 64): 1,024 trainable numbers, the only ones. The stage
    asked to pack (the default), pads instead and says why; the held-out greedy exact match runs; the
    artifact is a PREFIX_TUNING adapter that plain peft loads to the same logits, and export --merge is
    refused while the adapter export works."""
    from align.export import ExportError, export_artifact

    stage = sft_stage(small_data["sft"], lr=3e-2, eval_every=8, eval_exact_match=True,
                      data={"path": str(small_data["sft"]), "eval_fraction": 0.1})
    job = job_factory(small_model, [stage], adapter={"type": "prefix", "num_virtual_tokens": VIRTUAL})
    (result,), messages = run(job, tmp_path)

    assert any("padding_free: the prefix-tuning adapter puts its virtual tokens" in text for _, text, _ in messages)
    assert list(trained.trainable) == ["prompt_encoder.default.embedding.weight"]
    assert trained.trainable["prompt_encoder.default.embedding.weight"].numel() == VIRTUAL * 2 * 2 * 64
    losses = train_losses(tmp_path / "work")
    assert losses[-1] < losses[0]
    assert 0.0 <= metrics(tmp_path / "work", "sft")[-1]["eval_exact_match"] <= 1.0

    folder = Path(result.artifact.uri)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["prefix_projection"]) == (
        "PREFIX_TUNING", VIRTUAL, False)
    torch.testing.assert_close(peft_logits(small_model, folder), trained.logits, rtol=1e-4, atol=1e-4)
    card = (folder / "README.md").read_text()
    assert "A prefix-tuning adapter on" in card and f"prefix num_virtual_tokens={VIRTUAL}" in card

    with pytest.raises(ExportError, match=r"is a prefix-tuning adapter: .* export it without --merge"):
        export_artifact(folder, tmp_path / "merged", merge=True)
    assert not (tmp_path / "merged").exists()
    exported = export_artifact(folder, tmp_path / "adapter")
    assert (exported / "adapter_model.safetensors").is_file()


def test_prompt_tuning_from_text_then_dpo_continues_it_against_the_sft_prompt(
    small_model, small_data, job_factory, tmp_path, trained  # noqa: F811
):
    """SFT starts the 4 virtual embeddings from the text's token embeddings; the DPO stage after it continues
    them, its reference the SFT virtual tokens kept frozen (step-1 loss ln 2). Each artifact reloads with plain
    peft, whose logits start with the 4 virtual positions: the rest are the trained model's. The saved config
    names the base for its tokenizer as for the model, and the continued DPO adapter still says TEXT."""
    text = "answer with the sum"
    dpo = {"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 4, "max_steps": 2,
           "beta": 0.1, "lr": 1e-2}
    adapter = {"type": "prompt", "num_virtual_tokens": VIRTUAL, "prompt_init_text": text}
    job = job_factory(small_model, [sft_stage(small_data["sft"], steps=4, lr=3e-2), dpo], adapter=adapter)
    (sft, preference), messages = run(job, tmp_path)

    assert [stage for stage, text, _ in messages if text.startswith("padding_free: the prompt-tuning")] == [
        "sft", "dpo"]
    first = next(r for r in metrics(tmp_path / "work", "dpo") if r["step"] == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for result in (sft, preference):
        config = json.loads((Path(result.artifact.uri) / "adapter_config.json").read_text())
        assert (config["peft_type"], config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == (
            "PROMPT_TUNING", "TEXT", text)
        assert config["tokenizer_name_or_path"] == config["base_model_name_or_path"] == str(small_model)
    reloaded = peft_logits(small_model, Path(preference.artifact.uri))
    assert reloaded.shape[1] == VIRTUAL + PROBE.shape[1]
    torch.testing.assert_close(reloaded[:, VIRTUAL:], trained.logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(peft_logits(small_model, Path(sft.artifact.uri))[:, VIRTUAL:], trained.logits,
                              atol=1e-5)
    card = (Path(sft.artifact.uri) / "README.md").read_text()
    assert f'prompt num_virtual_tokens={VIRTUAL} init=text "{text}"' in card


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_greedy_generation_and_the_reference_see_the_virtual_tokens_as_training_does(kind, small_model):
    """:class:`CachedGenerator` on left-padded prompts of different lengths gives, for each, the tokens a greedy
    loop of whole forwards (the training forward, no cache, no padding) picks; :class:`Reference` of a fresh
    adapter computes the base model, without the virtual tokens."""
    from align.generation import CachedGenerator, SamplingParams
    from align.models.adapters import apply_adapter
    from align.models.reference import Reference
    from align.spec import AdapterSpec

    torch.manual_seed(0)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(small_model),
                          AdapterSpec(type=kind, num_virtual_tokens=VIRTUAL), task_type="CAUSAL_LM",
                          quantized=False).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    completions = CachedGenerator(model, AutoTokenizer.from_pretrained(small_model)).generate(
        prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            sequence = list(prompt)
            for _ in range(5):
                sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
            assert completion.token_ids == sequence[len(prompt):][: len(completion.token_ids)]
        with Reference(model, None).active():
            reference = model(PROBE).logits
        base = AutoModelForCausalLM.from_pretrained(small_model).eval()(PROBE).logits
    torch.testing.assert_close(reference, base, rtol=0, atol=0)
    assert not torch.allclose(model(PROBE).logits, base, atol=1e-3), "a fresh prefix or prompt is not a no-op"


@pytest.mark.parametrize(("adapter", "stage", "field", "says"), [
    ({"type": "prefix"}, {"type": "grpo", "reward": "exact_answer"}, "adapter.type",
     r"'prefix' cannot train stages\[1\], a grpo stage: .* use adapter.type 'lora', 'dora' or 'ia3'"),
    ({"type": "prompt"}, {"type": "ppo", "reward": "exact_answer", "critic_init": "policy"}, "adapter.type",
     r"'prompt' cannot train stages\[1\], a ppo stage"),
    ({"type": "prompt"}, {"type": "rloo", "reward": "exact_answer"}, "adapter.type", r"a rloo stage"),
    ({"type": "prefix"}, {"type": "rm"}, "adapter.type",
     r"'prefix' cannot train stages\[1\], an rm stage: .* read through its body alone"),
    ({"type": "prefix", "prompt_init_text": "hi"}, None, "adapter.prompt_init_text",
     r"adapter.type 'prompt', not 'prefix'; remove prompt_init_text"),
    ({"type": "prompt", "lora_plus_ratio": 4}, None, "adapter.lora_plus_ratio", r"'prompt' has none"),
    ({"type": "prompt", "num_virtual_tokens": 0}, None, "adapter.num_virtual_tokens", r"greater than or equal"),
])
def test_what_virtual_tokens_cannot_do_is_refused_by_the_spec(adapter, stage, field, says):
    from align.spec import SpecError, parse_spec

    stages = [{"type": "sft", "data": {"path": "d.jsonl"}}]
    if stage is not None:
        stages.append({**stage, "data": {"path": "p.jsonl"}})
    with pytest.raises(SpecError) as caught:
        parse_spec({"name": "j", "base_model": "builtin:tiny", "adapter": adapter, "stages": stages})
    ((where, message),) = caught.value.errors
    assert where == field
    assert re.search(says, message), message


def test_the_planner_counts_the_virtual_tokens_peft_trains(small_model):
    """The planner's count of prefix and prompt parameters against the adapter peft builds (2 layers,
    4 key-value heads of 16, hidden 64)."""
    from align.models.adapters import apply_adapter
    from align.plan_memory import ModelShape, adapter_parameters
    from align.spec import AdapterSpec

    base = AutoModelForCausalLM.from_pretrained(small_model)
    shape = ModelShape.from_config(base.config)
    for kind in ("prefix", "prompt"):
        spec = AdapterSpec(type=kind, num_virtual_tokens=7)
        model = apply_adapter(AutoModelForCausalLM.from_pretrained(small_model), spec, task_type="CAUSAL_LM",
                              quantized=False)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert adapter_parameters(shape, spec) == trainable, kind
