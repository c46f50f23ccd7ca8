"""Building the built-in model reports its progress and waits for a concurrent builder, without a full build."""

import re
import threading
import time

import filelock
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align import tiny


def test_pretraining_reports_the_first_step_and_every_tenth(monkeypatch):
    monkeypatch.setitem(tiny.PRETRAIN, "steps", 20)
    monkeypatch.setitem(tiny.PRETRAIN, "warmup_steps", 2)
    monkeypatch.setitem(tiny.PRETRAIN, "batch_size", 2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    sequences = torch.randint(32, (6, 8), generator=torch.Generator().manual_seed(0))
    messages: list[str] = []
    tiny.pretrain(LlamaForCausalLM(config), sequences, torch.Generator().manual_seed(0), messages.append)

    parsed = [re.fullmatch(r"pretraining step (\d+)/20 \((\d+)%\), loss (\d+\.\d{4})", m) for m in messages]
    assert all(parsed), messages
    assert [int(m[1]) for m in parsed] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [int(m[2]) for m in parsed] == [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(float(m[3]) > 0 for m in parsed)


def test_a_second_builder_says_it_waits_and_uses_the_first_ones_model(tmp_path):
    target = tmp_path / f"tiny-{tiny.BUILD_KEY}"
    messages: list[str] = []
    results = []
    other_builder = filelock.FileLock(tmp_path / f"tiny-{tiny.BUILD_KEY}.lock")
    other_builder.acquire()
    waiter = threading.Thread(target=lambda: results.append(tiny.build_tiny(tmp_path, progress=messages.append)))
    waiter.start()
    deadline = time.monotonic() + 30
    while not messages and time.monotonic() < deadline:
        time.sleep(0.05)
    waited = list(messages)
    target.mkdir()  # the other builder's finished model
    other_builder.release()
    waiter.join(timeout=30)

    assert waited, "build_tiny gave no 'waiting for another process' message within 30 s while another held the lock"
    assert results == [target]
    assert messages == [f"builtin:tiny: waiting for another process that is building it under {target}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"tiny-{tiny.BUILD_KEY}.lock"])


def test_a_cached_model_returns_at_once_without_messages(tmp_path):
    (tmp_path / f"tiny-{tiny.BUILD_KEY}").mkdir()
    messages: list[str] = []
    assert tiny.build_tiny(tmp_path, progress=messages.append) == tmp_path / f"tiny-{tiny.BUILD_KEY}"
    assert messages == []
