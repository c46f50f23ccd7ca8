"""The built-in model ``builtin:tiny``: a small Llama-style causal LM pretrained on simple English and on
text about numbers.

:func:`build_tiny` makes a complete local Hugging Face model folder (safetensors weights, config,
generation config, a byte-level BPE tokenizer with the default chat template) so demos and tests run
with no model hub. The model is not random: the build pretrains it briefly on a generated corpus of two
kinds of document. Half state whether numbers are even or odd, in the phrasings of the built-in
``parity`` task (:mod:`align.task`) and in plain statements, so the base model knows the answers that
the alignment stages then elicit in chat form. The other half are paragraphs of simple English over a
vocabulary of a few thousand words (:mod:`align.english`), so the tokenizer holds English words and the
model writes well-formed sentences that fine-tuning can shape.

The corpus is plain text: documents separated by ``<|end|>`` (also the EOS token), no chat markup, so
the role tokens of the chat template are unseen until fine-tuning, as with a real base model.

Builds train in fp32 on every machine (bf16 is emulated, and tens of times slower, on CPUs without
AVX512-BF16 or AMX) and are deterministic: seeded initialisation, data order and corpus, and a fixed
thread count; CPUs whose fp32 kernels differ may differ in the last bits. The folder is cached under
``cache_dir()/tiny-<BUILD_KEY>``; ``BUILD_KEY`` hashes every build parameter, the source of the corpus
generators, and the versions of the libraries that initialise and train the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import filelock
import tokenizers
import torch
import transformers

from align import english, english_forms, english_nouns, english_verbs, english_words, task
from align.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, PAD, ROLE_TOKENS, SPECIAL_TOKENS
from align.engine.schedule import schedule_curve
from align.paths import cache_dir

logger = logging.getLogger(__name__)

TINY_MODEL = "builtin:tiny"
BUILD_VERSION = 5

MODEL_CONFIG = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
VOCAB_SIZE = 1024
PRETRAIN = {
    "seed": 0,
    "documents": 12000,
    "english_documents": 3000,
    "english_sentences": (2, 5),
    "sequence_length": 64,
    "batch_size": 16,
    "steps": 400,
    "learning_rate": 3e-3,
    "warmup_steps": 30,
    "weight_decay": 0.01,
}
BUILD_THREADS = 4
"""At most this many CPU threads pretrain; fewer when the process may use fewer cores."""

_STATEMENTS = (
    "{number} is {parity}.",
    "The number {number} is {parity}.",
    "{number} is an {parity} number.",
)


def build_key() -> str:
    """Short hash of everything the built weights depend on: the build parameters, the corpus generators'
    source, and the library versions that tokenise, initialise and train the model."""
    generators = (english, english_nouns, english_verbs, english_forms, english_words)
    sources = [Path(module.__file__).read_bytes() for module in generators]
    parameters = [
        BUILD_VERSION, MODEL_CONFIG, VOCAB_SIZE, PRETRAIN, SPECIAL_TOKENS, DEFAULT_CHAT_TEMPLATE,
        task.MAX_DIGITS, task.PHRASINGS, task.ANSWERS, _STATEMENTS,
        [hashlib.sha256(source).hexdigest() for source in sources],
        [torch.__version__, transformers.__version__, tokenizers.__version__], "fp32",
    ]
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]


BUILD_KEY = build_key()
MODEL_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
)


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds every file a build writes."""
    return all((folder / name).is_file() for name in MODEL_FILES)


def _clear_leftovers(root: Path, target: Path) -> None:
    """Remove what earlier builds left, under the build lock (so no build is running): staging folders of
    builders that were killed, and a target folder without every file of a build."""
    for staging in root.glob(f".tiny-{BUILD_KEY}-*"):
        shutil.rmtree(staging, ignore_errors=True)
    if target.exists():
        logger.warning("%s: %s lacks some of %s; building it again", TINY_MODEL, target, ", ".join(MODEL_FILES))
        shutil.rmtree(target)


def build_tiny(cache_root: Path | None = None, progress: Callable[[str], None] | None = None) -> Path:
    """The local folder of the built-in model, built on first use: 66-79 s measured on a 2-core Xeon, with
    its AVX-512/AMX kernels or held to AVX2 (fp32 alike); a CPU with slower cores takes longer.

    The folder is built in a temporary folder next to it and renamed into place under a file lock,
    so concurrent builders (other processes, other ranks) wait for one build and never see a partial
    folder. ``progress`` gets what the build is doing in words: waiting for another builder, the
    tokenizer trained, every tenth of the pretraining steps, the folder in place. A cached model
    returns at once, with no message.
    """
    root = Path(cache_root or cache_dir())
    target = root / f"tiny-{BUILD_KEY}"
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)

    def report(text: str) -> None:
        logger.info("%s", text)
        if progress is not None:
            progress(text)

    lock = filelock.FileLock(root / f"tiny-{BUILD_KEY}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        report(f"{TINY_MODEL}: waiting for another process that is building it under {target}")
        lock.acquire()
    try:
        if is_complete(target):
            return target
        _clear_leftovers(root, target)
        staging = Path(tempfile.mkdtemp(prefix=f".tiny-{BUILD_KEY}-", dir=root))
        logger.warning("building the built-in model %s (a minute or two, once per machine) under %s",
                       TINY_MODEL, target)
        if progress is not None:
            progress(f"{TINY_MODEL}: building it (a minute or two, once per machine) under {target}")
        started = time.perf_counter()
        try:
            _build_into(staging, log=lambda text: report(f"{TINY_MODEL}: {text}"))
            missing = sorted(name for name in MODEL_FILES if not (staging / name).is_file())
            if missing:
                raise RuntimeError(f"building {TINY_MODEL} wrote no {', '.join(missing)} under {staging}")
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        report(f"{TINY_MODEL}: built in {time.perf_counter() - started:.0f}s")
    finally:
        lock.release()
    return target


# --- corpus -------------------------------------------------------------------------------------------


def pretraining_corpus(seed: int, documents: int, english_documents: int = 0,
                       english_sentences: tuple[int, int] = (2, 5)) -> list[str]:
    """Parity documents and English paragraphs, shuffled together.

    A parity document has a few lines, each a fresh number and its parity: a task question with its
    answer after a space or on the next line (as in a chat reply, so the bare words are tokens too), or
    a statement. An English document is a paragraph of ``english_sentences`` (low, high) sentences."""
    rng = random.Random(seed)
    corpus = [_parity_document(rng) for _ in range(documents)]
    corpus += [english.paragraph(rng, rng.randint(*english_sentences)) for _ in range(english_documents)]
    rng.shuffle(corpus)
    return corpus


def _parity_document(rng: random.Random) -> str:
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
    return "\n".join(lines)


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


def pretraining_schedule(optimizer: torch.optim.Optimizer) -> Callable[[int], float]:
    """Multiplier of the peak learning rate by step: linear warm-up to the peak at step ``warmup_steps - 1``,
    the peak again at step ``warmup_steps``, then cosine decay to 5% of it (transformers' ``cosine_with_min_lr``).

    transformers' warm-up is s / W and reaches the peak at step W; the built model was trained with
    (s + 1) / W, which is its warm-up read one step ahead. The decay is read as it is.
    """
    warmup_steps = PRETRAIN["warmup_steps"]
    curve = schedule_curve(optimizer, "cosine_with_min_lr", warmup_steps, PRETRAIN["steps"], min_lr_rate=0.05)
    return lambda step: curve(step + 1 if step < warmup_steps else step)


def pretrain(model, sequences: torch.Tensor, generator: torch.Generator, log=None) -> None:
    """AdamW with linear warm-up and cosine decay over ``PRETRAIN["steps"]`` random batches, in fp32.

    ``log`` gets the step count and loss after the first step and each further tenth of the steps."""
    batch_size, steps = PRETRAIN["batch_size"], PRETRAIN["steps"]
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=PRETRAIN["learning_rate"], weight_decay=PRETRAIN["weight_decay"], betas=(0.9, 0.95)
    )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, pretraining_schedule(optimizer))
    model.train()
    for step in range(steps):
        batch = sequences[torch.randint(len(sequences), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if log is not None and (done == 1 or done * 10 // steps > step * 10 // steps):
            log(f"pretraining step {done}/{steps} ({done * 100 // steps}%), loss {loss.item():.4f}")
    model.eval()


def _build_into(folder: Path, log=None) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(min(BUILD_THREADS, len(os.sched_getaffinity(0))))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(PRETRAIN["seed"])
            documents = pretraining_corpus(
                PRETRAIN["seed"], PRETRAIN["documents"], PRETRAIN["english_documents"], PRETRAIN["english_sentences"]
            )
            tokenizer = train_tokenizer(documents)
            model = LlamaForCausalLM(_config(tokenizer))
            generator = torch.Generator().manual_seed(PRETRAIN["seed"])
            sequences = _packed_sequences(tokenizer, documents, PRETRAIN["sequence_length"])
            if log is not None:
                log(f"tokenizer trained ({len(tokenizer)} tokens) on {len(documents)} documents; "
                    f"pretraining {sum(p.numel() for p in model.parameters()):,} parameters")
            started = time.perf_counter()
            pretrain(model, sequences, generator, log)
            if log is not None:
                log(f"pretrained on {sequences.numel()} tokens in {time.perf_counter() - started:.1f}s")
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    _save(model, tokenizer, folder)


def _save(model, tokenizer, folder: Path) -> None:
    """Write the folder as ``save_pretrained`` lays it out (the same bytes), on any process.

    Whichever process takes the build lock first builds, and that may be a rank other than 0 of a
    distributed stage; ``PreTrainedModel.save_pretrained`` writes neither weights nor config on such a
    rank, which would leave a folder holding only the tokenizer.
    """
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    weights = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
