"""Building the built-in model reports its progress and waits for a concurrent builder, without a full build."""

import re
import threading
import time
from pathlib import Path

import filelock
import pytest
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
    finished(target)  # the other builder's model
    other_builder.release()
    waiter.join(timeout=30)

    assert waited, "build_tiny gave no 'waiting for another process' message within 30 s while another held the lock"
    assert results == [target]
    assert messages == [f"builtin:tiny: waiting for another process that is building it under {target}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"tiny-{tiny.BUILD_KEY}.lock"])


def finished(folder):
    """A folder holding every file a build writes (empty files: nothing here loads them)."""
    folder.mkdir()
    for name in tiny.MODEL_FILES:
        (folder / name).write_bytes(b"")
    return folder


def test_a_cached_model_returns_at_once_without_messages(tmp_path):
    finished(tmp_path / f"tiny-{tiny.BUILD_KEY}")
    messages: list[str] = []
    assert tiny.build_tiny(tmp_path, progress=messages.append) == tmp_path / f"tiny-{tiny.BUILD_KEY}"
    assert messages == []


def test_a_folder_missing_files_and_killed_builders_leftovers_are_cleared_and_built_again(tmp_path, monkeypatch):
    target = tmp_path / f"tiny-{tiny.BUILD_KEY}"
    target.mkdir()
    (target / "tokenizer.json").write_text("{}")  # no config, no weights: not a model
    leftover = tmp_path / f".tiny-{tiny.BUILD_KEY}-killed"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    built = []

    def build_into(folder, log=None):
        built.append(folder)
        for name in tiny.MODEL_FILES:
            (folder / name).write_text(name)

    monkeypatch.setattr(tiny, "_build_into", build_into)
    assert tiny.build_tiny(tmp_path) == target
    assert len(built) == 1 and not built[0].exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(tiny.MODEL_FILES)
    assert (target / "config.json").read_text() == "config.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, f"tiny-{tiny.BUILD_KEY}.lock"])


def test_a_build_that_writes_no_weights_fails_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, "_build_into", lambda folder, log=None: (folder / "tokenizer.json").write_text("{}"))
    with pytest.raises(RuntimeError, match="wrote no config.json, generation_config.json, model.safetensors, "
                                           "tokenizer_config.json under "):
        tiny.build_tiny(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{tiny.BUILD_KEY}.lock"]


def _save_on_rank(rank: int, store: str, folder: str) -> None:
    import torch.distributed as dist
    from data_helpers import build_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        if rank == 1:
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
            tiny._save(LlamaForCausalLM(config), build_tokenizer(), Path(folder))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_one_of_a_distributed_stage_writes_the_whole_folder(tmp_path):
    """transformers' save_pretrained writes no weights or config on a rank other than 0; the built-in model
    is built by whichever rank takes the lock, so its build writes every file on any rank."""
    folder = tmp_path / "model"
    folder.mkdir()
    torch.multiprocessing.spawn(_save_on_rank, args=(str(tmp_path / "store"), str(folder)), nprocs=2)
    assert {p.name for p in folder.iterdir()} >= set(tiny.MODEL_FILES)
    model = LlamaForCausalLM.from_pretrained(folder)
    assert model.config.architectures == ["LlamaForCausalLM"] and model.config.vocab_size == 64
