"""Shared by the export tests: 16 prompts, logits over their tokens, and adapters published without training."""

from __future__ import annotations

from pathlib import Path

import torch

from align.artifacts import ArtifactStore, PublishedArtifact
from align.model_card import write_model_card
from align.models.adapters import apply_adapter, save_trainable
from align.models.load import load_causal_lm, load_tokenizer
from align.precision import DTYPES

PROMPTS = [f"add {n} and {n * 7 % 13}" + " ok" * (n % 3) for n in range(16)]


def prompt_logits(model, tokenizer) -> torch.Tensor:
    """The model's logits at every real (non-padding) token of the 16 prompts, as one (tokens, vocab) tensor."""
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["attention_mask"].bool()].float()


def publish_random_adapter(job, base: Path, root: Path, seed: int = 0, precision: str = "fp32") -> PublishedArtifact:
    """A peft adapter of ``job``'s type on ``base`` (4-bit when the job quantises), with B matrices drawn at
    random so that it changes the model, saved and carded as a stage saves it, and published to ``root``.
    ``precision`` is the dtype the base is loaded in, as a stage training in it loads it, and is recorded."""
    torch.manual_seed(seed)
    model = load_causal_lm(base, DTYPES[precision], job.quantization)
    model = apply_adapter(model, job.adapter, task_type="CAUSAL_LM", quantized=job.quantization is not None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    out = root.parent / f"{job.name}-out"
    save_trainable(model, out, 0, write=True, base_model=str(base))
    load_tokenizer(base).save_pretrained(out)
    lineage = f"{job.name}.sft"
    chosen = {"requested": precision, "precision": precision, "device": "cpu", "native_bf16": False,
              "reason": "set by the test"}
    write_model_card(out, job, 0, kind="adapter", lineage=lineage, parents=[], data_fingerprints={},
                     metrics={"loss": 1.0}, precision=chosen)
    return ArtifactStore(root).publish(
        out, lineage=lineage, kind="adapter", stage={"type": "sft", "index": 0, "name": "sft"},
        base_model=str(base), spec_hash=job.hash(), job={"id": None, "name": job.name}, precision=chosen,
    )
