"""Shared test set-up: one cache for built models and compiled ops, a small model, small datasets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Built-in model, built-in data and DeepSpeed's compiled ops are built once per checkout.
os.environ.setdefault("ALIGN_CACHE_DIR", str(REPO / ".align" / "cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".align" / "cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(REPO / "tests" / "unit"))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and a small byte-level BPE tokenizer, saved as a local folder."""
    import torch
    from data_helpers import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("small-model")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """SFT rows (messages) and preference rows (prompt/chosen/rejected) of varying length."""
    root = tmp_path_factory.mktemp("small-data")
    sft = [
        {"messages": [{"role": "user", "content": f"add {i} and {i * 7 % 13}"},
                      {"role": "assistant", "content": str(i + i * 7 % 13) + " ok" * (i % 4)}]}
        for i in range(48)
    ]
    prefs = [
        {"prompt": f"add {i} and {i * 7 % 13}", "chosen": str(i + i * 7 % 13) + " yes" * (i % 3),
         "rejected": str(i + i * 7 % 13 + 1)}
        for i in range(48)
    ]
    return {"sft": _write_jsonl(root / "sft.jsonl", sft), "prefs": _write_jsonl(root / "prefs.jsonl", prefs)}


def make_job(model: Path, stages: list[dict], **overrides):
    """A JobSpec on ``model`` with small defaults; ``overrides`` replace top-level fields."""
    from align.spec import parse_spec

    spec = {
        "name": "test",
        "base_model": str(model),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "stages": stages,
    }
    spec.update(overrides)
    return parse_spec(spec)


@pytest.fixture
def job_factory():
    return make_job
