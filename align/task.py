"""The built-in ``arith`` task: small sums and differences on which alignment is measurable.

Every prompt asks for one *fact* ``a + b`` or ``a - b`` (operands ``0..OPERAND_MAX``, no negative
results). The built-in model (:mod:`align.tiny`) is pretrained on all facts, so it knows the answers;
what the alignment stages change is how it answers a chat prompt.

The splits partition the facts, so no two splits share a prompt (or a fact):

| split | rows | purpose |
|---|---|---|
| ``sft`` | ``messages`` | demonstrations of mixed quality: most subtraction answers carry a fencepost error (one too many), a few addition answers are off by one, so supervised fine-tuning alone learns the mistakes |
| ``prefs`` | ``prompt``, ``chosen``, ``rejected`` | chosen is the correct answer, rejected a mistake of the kinds found in ``sft`` |
| ``prefs_eval`` | as ``prefs`` | held-out pairs (implicit-reward or reward-model accuracy) |
| ``eval`` | ``prompt``, ``completion`` | held-out prompts with the correct answer (greedy exact match) |
| ``prompts`` | ``prompt`` | prompts only, for reinforcement learning with :func:`exact_answer_reward` |

Everything is generated from ``SEED``; :func:`materialize` writes a split as JSON Lines under the
cache and returns the path, so ``builtin:arith/<split>`` can be used wherever a dataset path is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from align.paths import cache_dir

TASK_VERSION = 1
SEED = 1234
OPERAND_MAX = 39
OPERATIONS = ("+", "-")
OPERATION_WORDS = {"+": "plus", "-": "minus"}
PHRASINGS = (
    "What is {a} {symbol} {b}?",
    "What is {a} {word} {b}?",
    "Compute {a} {symbol} {b}.",
)
SPLIT_SIZES = {"sft": 512, "prefs": 768, "prefs_eval": 128, "eval": 192, "prompts": 256}
MISTAKE_RATE = {"+": 0.1, "-": 0.9}
"""Fraction of ``sft`` demonstrations, per operation, that give a wrong answer."""

BUILTIN_DATASETS = tuple(f"builtin:arith/{split}" for split in SPLIT_SIZES)

_FACT_PATTERN = re.compile(r"(\d+) (\+|-|plus|minus) (\d+)")
_SYMBOLS = {"+": "+", "-": "-", "plus": "+", "minus": "-"}


@dataclass(frozen=True)
class Fact:
    a: int
    operation: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.operation == "+" else self.a - self.b

    def equation(self) -> str:
        """``"17 + 25"``."""
        return f"{self.a} {self.operation} {self.b}"

    def prompt(self, phrasing: int) -> str:
        template = PHRASINGS[phrasing]
        return template.format(a=self.a, b=self.b, symbol=self.operation, word=OPERATION_WORDS[self.operation])


def all_facts() -> list[Fact]:
    """Every fact of the task in a fixed order: all sums, then the differences with ``a >= b``."""
    operands = range(OPERAND_MAX + 1)
    sums = [Fact(a, "+", b) for a in operands for b in operands]
    differences = [Fact(a, "-", b) for a in operands for b in operands if a >= b]
    return sums + differences


def fact_of(prompt: str) -> Fact:
    """The fact a prompt asks about; ``ValueError`` if the prompt is not an ``arith`` prompt."""
    match = _FACT_PATTERN.search(prompt)
    if match is None:
        raise ValueError(f"not an arith prompt (expected e.g. 'What is 17 + 25?'): {prompt!r}")
    return Fact(int(match.group(1)), _SYMBOLS[match.group(2)], int(match.group(3)))


def answer_of(prompt: str) -> str:
    """The correct answer to an ``arith`` prompt, as the text a reply should consist of."""
    return str(fact_of(prompt).answer)


def exact_answer_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the correct answer."""
    return 1.0 if completion.strip() == answer_of(prompt) else 0.0


def mistake(fact: Fact, rng: random.Random) -> int:
    """A plausible wrong answer: a difference one too large (counting both ends), a sum off by one."""
    if fact.operation == "-":
        return fact.answer + 1
    if fact.answer == 0:
        return 1
    return fact.answer + rng.choice((-1, 1))


def split_facts(seed: int = SEED) -> dict[str, list[Fact]]:
    """Disjoint sets of facts per split, half sums and half differences each."""
    rng = random.Random(seed)
    pools = {operation: [f for f in all_facts() if f.operation == operation] for operation in OPERATIONS}
    for pool in pools.values():
        rng.shuffle(pool)
    taken = {operation: 0 for operation in OPERATIONS}
    result = {}
    for split, size in SPLIT_SIZES.items():
        facts = []
        for index, operation in enumerate(OPERATIONS):
            count = size // len(OPERATIONS) + (index < size % len(OPERATIONS))
            pool = pools[operation]
            if taken[operation] + count > len(pool):
                raise ValueError(f"SPLIT_SIZES need more '{operation}' facts than the {len(pool)} there are")
            facts += pool[taken[operation] : taken[operation] + count]
            taken[operation] += count
        rng.shuffle(facts)
        result[split] = facts
    return result


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """All rows of every split, deterministic in ``seed``."""
    rng = random.Random(seed + 1)
    splits: dict[str, list[dict]] = {}
    for split, facts in split_facts(seed).items():
        rows = []
        for fact in facts:
            prompt = fact.prompt(rng.randrange(len(PHRASINGS)))
            correct = str(fact.answer)
            if split == "sft":
                wrong = rng.random() < MISTAKE_RATE[fact.operation]
                answer = str(mistake(fact, rng)) if wrong else correct
                rows.append(
                    {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                )
            elif split in ("prefs", "prefs_eval"):
                rows.append({"prompt": prompt, "chosen": correct, "rejected": str(mistake(fact, rng))})
            elif split == "eval":
                rows.append({"prompt": prompt, "completion": correct})
            else:
                rows.append({"prompt": prompt})
        splits[split] = rows
    return splits


def data_key() -> str:
    """Short hash of everything the rows depend on; part of the cache folder's name."""
    parameters = [TASK_VERSION, SEED, OPERAND_MAX, PHRASINGS, SPLIT_SIZES, MISTAKE_RATE]
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]


def materialize(name: str, cache_root: Path | None = None) -> Path:
    """Write the built-in dataset ``name`` (e.g. ``builtin:arith/sft``) as JSON Lines; return its path.

    The file lives under ``cache_root or cache_dir()`` and is written once: a temporary file renamed
    into place, so concurrent callers see either no file or the whole file.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
    split = name.split("/", 1)[1]
    folder = Path(cache_root or cache_dir()) / f"arith-{data_key()}"
    path = folder / f"{split}.jsonl"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    rows = build_splits()[split]
    handle, temporary = tempfile.mkstemp(prefix=f".{split}-", suffix=".jsonl", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            for row in rows:
                stream.write(json.dumps(row) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _prompt_and_reference(row: dict) -> tuple[list[dict], str]:
    if "messages" in row:
        return row["messages"][:-1], row["messages"][-1]["content"]
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    reference = row.get("completion", row.get("chosen"))
    if reference is None:
        reference = answer_of(messages[-1]["content"])
    if isinstance(reference, list):
        reference = reference[-1]["content"]
    return messages, reference


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int = 8, batch_size: int = 64) -> float:
    """Fraction of rows whose greedy reply, stripped, equals the reference answer.

    Rows may be ``eval`` rows (prompt and completion), preference rows (the chosen answer is the
    reference), ``messages`` rows (the last assistant message) or prompt-only rows (the correct
    answer). Prompts are rendered with the chat template and left-padded; generation stops at EOS.
    Works on a plain model and on a peft model.
    """
    if not rows:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    correct = 0
    try:
        for begin in range(0, len(rows), batch_size):
            chunk = [_prompt_and_reference(row) for row in rows[begin : begin + batch_size]]
            encoded = [
                list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                   add_generation_prompt=True)["input_ids"])
                for messages, _ in chunk
            ]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
            )
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
            )
            replies = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
            correct += sum(reply.strip() == reference.strip() for reply, (_, reference) in zip(replies, chunk))
    finally:
        model.train(was_training)
    return correct / len(rows)
