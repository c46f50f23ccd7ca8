"""The built-in model ``builtin:tiny``: a small Llama-style causal LM pretrained on text about numbers.

:func:`build_tiny` makes a complete local Hugging Face model folder (safetensors weights, config,
generation config, a byte-level BPE tokenizer with the default chat template) so demos and tests run
with no model hub. The model is not random: the build pretrains it briefly on a generated corpus that
states whether numbers are even or odd, in the phrasings of the built-in ``parity`` task
(:mod:`align.task`) and in plain statements, so the base model knows the answers that the alignment
stages then elicit in chat form.

The corpus is plain text: documents separated by ``<|end|>`` (also the EOS token), no chat markup, so
the role tokens of the chat template are unseen until fine-tuning, as with a real base model.

Builds are deterministic on a machine: seeded initialisation, data order and corpus, and a fixed
thread count. Training runs in bf16 autocast on the CPU, so weights built on a machine whose CPU
kernels differ (for example one without AVX-512 BF16/AMX) may differ in the last bits. The folder is
cached under ``cache_dir()/tiny-<BUILD_KEY>``; ``BUILD_KEY`` hashes every build parameter.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from align import task
from align.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, PAD, ROLE_TOKENS, SPECIAL_TOKENS
from align.paths import cache_dir

TINY_MODEL = "builtin:tiny"
BUILD_VERSION = 4

MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
VOCAB_SIZE = 1024
PRETRAIN = dict(
    seed=0,
    documents=12000,
    sequence_length=64,
    batch_size=16,
    steps=400,
    learning_rate=3e-3,
    warmup_steps=30,
    weight_decay=0.01,
)
BUILD_THREADS = 4
"""At most this many CPU threads pretrain; fewer when the process may use fewer cores."""

_STATEMENTS = (
    "{number} is {parity}.",
    "The number {number} is {parity}.",
    "{number} is an {parity} number.",
)


def build_key() -> str:
    """Short hash of every parameter the built folder depends on."""
    parameters = [
        BUILD_VERSION, MODEL_CONFIG, VOCAB_SIZE, PRETRAIN, SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE,
        task.MAX_DIGITS, task.PHRASINGS, task.ANSWERS, _STATEMENTS,
    ]
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]


BUILD_KEY = build_key()


def build_tiny(cache_root: Path | None = None) -> Path:
    """The local folder of the built-in model, built on first use (about a minute on two CPU cores).

    The folder is built in a temporary folder next to it and renamed into place under a file lock,
    so concurrent builders (other processes, other ranks) wait for one build and never see a partial
    folder.
    """
    root = Path(cache_root or cache_dir())
    target = root / f"tiny-{BUILD_KEY}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"tiny-{BUILD_KEY}.lock"):
        if target.is_dir():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".tiny-{BUILD_KEY}-", dir=root))
        try:
            _build_into(staging)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- corpus -------------------------------------------------------------------------------------------


def pretraining_corpus(seed: int, documents: int) -> list[str]:
    """Documents of a few lines, each a fresh number and its parity: a task question with its answer after
    a space or on the next line (as in a chat reply, so the bare words are tokens too), or a statement."""
    rng = random.Random(seed)
    corpus = []
    for _ in range(documents):
        lines = []
        for _ in range(rng.randint(3, 6)):
            item = task.random_item(rng, rng.choice(task.FAMILIES))
            form = rng.random()
            if form < 0.35:
                lines.append(f"{item.prompt()} {item.answer}")
            elif form < 0.7:
                lines.append(f"{item.prompt()}\n{item.answer}")
            else:
                lines.append(rng.choice(_STATEMENTS).format(number=item.number, parity=item.answer))
        corpus.append("\n".join(lines))
    return corpus


# --- tokenizer ----------------------------------------------------------------------------------------


def train_tokenizer(documents: list[str]):
    """Byte-level BPE with digits split one by one; the special tokens come first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


# --- model --------------------------------------------------------------------------------------------


def _config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )


def _packed_sequences(tokenizer, documents: list[str], length: int) -> torch.Tensor:
    """The documents' tokens joined by EOS and cut into ``(n, length)`` rows."""
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += encoded
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // length
    return torch.tensor(ids[: rows * length]).view(rows, length)


def pretrain(model, sequences: torch.Tensor, generator: torch.Generator, log=None) -> None:
    """AdamW with linear warm-up and cosine decay over ``PRETRAIN["steps"]`` random batches, bf16 autocast."""
    batch_size, steps = PRETRAIN["batch_size"], PRETRAIN["steps"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=PRETRAIN["weight_decay"], betas=(0.9, 0.95)
    )

    def schedule(step: int) -> float:
        if step < PRETRAIN["warmup_steps"]:
            return (step + 1) / PRETRAIN["warmup_steps"]
        progress = (step - PRETRAIN["warmup_steps"]) / max(1, steps - PRETRAIN["warmup_steps"])
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    for step in range(steps):
        batch = sequences[torch.randint(len(sequences), (batch_size,), generator=generator)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.4f}")
    model.eval()


def _build_into(folder: Path, log=None) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(min(BUILD_THREADS, len(os.sched_getaffinity(0))))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRETRAIN["seed"])
            documents = pretraining_corpus(PRETRAIN["seed"], PRETRAIN["documents"])
            tokenizer = train_tokenizer(documents)
            model = LlamaForCausalLM(_config(tokenizer))
            generator = torch.Generator().manual_seed(PRETRAIN["seed"])
            sequences = _packed_sequences(tokenizer, documents, PRETRAIN["sequence_length"])
            started = time.perf_counter()
            pretrain(model, sequences, generator, log)
            if log is not None:
                log(f"pretrained on {sequences.numel()} tokens in {time.perf_counter() - started:.1f}s")
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
