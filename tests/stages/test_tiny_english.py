"""The built-in tiny model knows some simple English: its tokenizer holds English words, and a short SFT on
English replies makes a chat policy whose sampled replies are sentences made mostly of English words.

Measured on the two kinds of CPU (the model built with AVX-512 and with AVX2 kernels): 71-72% of sampled
words are English words after SFT (49-62% before), and 97-100% of replies end a sentence (9-66% before:
the base model's own builds differ most there). A model of this size pretrained for about a minute still
spells rarer words wrongly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from align import english
from align.runner import run_job
from align.spec import parse_spec

pytestmark = pytest.mark.slow

REQUESTS = ("Tell me a story.", "Write two sentences.", "Say something about your day.", "Describe a scene.")


def english_chats(path: Path, rows: int, seed: int) -> Path:
    rng = random.Random(seed)
    chats = [{"messages": [{"role": "user", "content": rng.choice(REQUESTS)},
                           {"role": "assistant", "content": english.paragraph(rng, 2)}]} for _ in range(rows)]
    path.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return path


def sample_replies(model, tokenizer, count: int) -> list[str]:
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": REQUESTS[i % len(REQUESTS)]}],
                                             tokenize=False, add_generation_prompt=True) for i in range(count)]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=48, do_sample=True, temperature=0.7,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def well_formed(replies: list[str]) -> tuple[float, float]:
    """(fraction of words that are English words, fraction of replies that end a sentence)."""
    words = [w for reply in replies for w in english.words(reply)]
    known = sum(w in english.VOCABULARY for w in words) / max(len(words), 1)
    ended = sum(reply[-1:] in (".", "?", "!") for reply in replies) / len(replies)
    return known, ended


def test_the_tokenizer_reaches_its_size_and_holds_english_words():
    from align.models.load import load_tokenizer
    from align.tiny import VOCAB_SIZE, build_tiny

    tokenizer = load_tokenizer(build_tiny())
    assert len(tokenizer) == VOCAB_SIZE
    text = " ".join(english.sentence(random.Random(i)) for i in range(200))
    # Common words are single tokens, so English text does not tokenise letter by letter.
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 0.45 * len(text)


def test_a_short_sft_on_english_replies_writes_well_formed_sentences(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.models.load import load_tokenizer
    from align.tiny import build_tiny

    data = english_chats(tmp_path / "chats.jsonl", rows=384, seed=1)
    job = parse_spec({
        "name": "english", "base_model": "builtin:tiny",
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "deepspeed": {"precision": "fp32"}, "resources": {"cpus_per_worker": 2},
        "stages": [{"type": "sft", "data": {"path": str(data)}, "epochs": 3, "batch_size": 16, "lr": 2e-3,
                    "max_length": 96, "checkpoint_every": None}],
    })
    (sft,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    folder = build_tiny()
    tokenizer = load_tokenizer(folder)
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    base_known, base_ended = well_formed(sample_replies(base, tokenizer, 32))
    policy = PeftModel.from_pretrained(base, sft.artifact.uri).eval()
    replies = sample_replies(policy, tokenizer, 32)
    known, ended = well_formed(replies)
    print(f"English words: base {base_known:.3f} -> sft {known:.3f}; replies that end a sentence: "
          f"base {base_ended:.3f} -> sft {ended:.3f}; e.g. {replies[:3]}")
    assert known >= 0.65
    assert ended >= 0.9
    assert known > base_known and ended >= base_ended
