"""The built-in ``parity`` task: is a number even or odd? Alignment is measurable on it.

Every prompt names one number (1 to 5 digits) and asks whether it is even or odd, in one of two
families of phrasing: ``ask`` ("Is 4719 even or odd?") and ``tell`` ("Tell me whether 4719 is even or
odd."). The answer is one word, ``even`` or ``odd``. The built-in model (:mod:`align.tiny`) is
pretrained on text that states the parity of numbers, so it knows the answers; what the alignment
stages change is how it answers a chat prompt.

The splits use disjoint numbers, so no two splits share a prompt. Every row is conversational (lists
of ``{"role", "content"}`` messages), so every stage renders it with the chat template, the way the
model is asked at inference. The splits, with their columns and purpose:

- ``sft`` (``messages``): demonstrations of mixed quality: most ``tell`` answers give the wrong
  parity, a few ``ask`` answers do too, so supervised fine-tuning alone learns the mistake.
- ``prefs`` (``prompt`` as the user turn, ``chosen`` and ``rejected`` as assistant turns): chosen is
  the right parity, rejected the wrong one.
- ``prefs_eval`` (as ``prefs``): held-out pairs (implicit-reward or reward-model accuracy).
- ``eval`` (``prompt`` as the user turn, ``completion`` as the assistant turn): held-out prompts with
  the correct answer (greedy exact match).
- ``prompts`` (``prompt`` as the user turn): prompts only, for reinforcement learning with
  :func:`exact_answer_reward`.
- ``kto`` (``prompt`` as the user turn, ``completion`` as the assistant turn, ``label``): unpaired rows, one
  answer per prompt, in TRL's KTO layout: the right parity with ``label`` true (desirable) for about
  half of them, the wrong parity with ``label`` false for the rest.
- ``kto_eval`` (as ``kto``): held-out unpaired rows.
- ``eval_tell`` (as ``eval``): the ``tell`` rows of ``eval``, the family supervised fine-tuning gets
  mostly wrong.

Everything is generated from ``SEED``; :func:`materialize` writes a split as JSON Lines under the
cache and returns the path, so ``builtin:parity/<split>`` can be used wherever a dataset path is.
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

from align.paths import cache_dir

TASK_VERSION = 5
SEED = 1234
MAX_DIGITS = 5
PHRASINGS = {
    "ask": ("Is {number} even or odd?", "Is the number {number} even or odd?"),
    "tell": ("Tell me whether {number} is even or odd.", "Say if {number} is even or odd."),
}
FAMILIES = tuple(PHRASINGS)
ANSWERS = ("even", "odd")
SPLIT_SIZES = {"sft": 512, "prefs": 640, "prefs_eval": 128, "eval": 160, "prompts": 192, "kto": 640, "kto_eval": 128}
MISTAKE_RATE = {"ask": 0.1, "tell": 0.9}
"""Fraction of ``sft`` demonstrations, per family, that give the wrong parity."""
DESIRABLE_RATE = 0.5
"""Fraction of ``kto`` and ``kto_eval`` rows whose answer is right (``label`` true)."""

DERIVED_SPLITS = {"eval_tell": ("eval", "tell")}
"""Splits that are one family's rows of another split: (source split, family)."""

BUILTIN_DATASETS = tuple(f"builtin:parity/{split}" for split in [*SPLIT_SIZES, *DERIVED_SPLITS])

_NUMBER_PATTERN = re.compile(r"\d+")


@dataclass(frozen=True)
class Item:
    """One prompt of the task: a number and how the question is phrased."""

    number: int
    family: str
    phrasing: int

    @property
    def answer(self) -> str:
        return parity(self.number)

    def prompt(self) -> str:
        return PHRASINGS[self.family][self.phrasing].format(number=self.number)


def parity(number: int) -> str:
    return ANSWERS[number % 2]


def random_number(rng: random.Random) -> int:
    """1 to ``MAX_DIGITS`` digits, each length equally likely."""
    return rng.randrange(10 ** rng.randint(1, MAX_DIGITS))


def random_item(rng: random.Random, family: str, number: int | None = None) -> Item:
    number = random_number(rng) if number is None else number
    return Item(number=number, family=family, phrasing=rng.randrange(len(PHRASINGS[family])))


def answer_of(prompt: str) -> str:
    """The correct answer to a ``parity`` prompt; ``ValueError`` if the prompt names no number."""
    match = _NUMBER_PATTERN.search(prompt)
    if match is None:
        raise ValueError(f"not a parity prompt (expected e.g. 'Is 4719 even or odd?'): {prompt!r}")
    return parity(int(match.group(0)))


def exact_answer_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, is exactly the right parity."""
    return 1.0 if completion.strip() == answer_of(prompt) else 0.0


def mistake(answer: str) -> str:
    """The wrong answer: the other parity."""
    return ANSWERS[1 - ANSWERS.index(answer)]


def split_items(seed: int = SEED) -> dict[str, list[Item]]:
    """Items per split, half of each family, with numbers never shared between splits."""
    rng = random.Random(seed)
    used: set[int] = set()
    result = {}
    for split, size in SPLIT_SIZES.items():
        items = []
        for index in range(size):
            number = random_number(rng)
            while number in used:
                number = random_number(rng)
            used.add(number)
            items.append(random_item(rng, FAMILIES[index % len(FAMILIES)], number))
        rng.shuffle(items)
        result[split] = items
    return result


def build_splits(seed: int = SEED) -> dict[str, list[dict]]:
    """All rows of every split, deterministic in ``seed``."""
    rng = random.Random(seed + 1)
    splits: dict[str, list[dict]] = {}
    items_of = split_items(seed)
    for split, items in items_of.items():
        rows = []
        for item in items:
            prompt, correct = item.prompt(), item.answer
            question = [{"role": "user", "content": prompt}]
            if split == "sft":
                answer = mistake(correct) if rng.random() < MISTAKE_RATE[item.family] else correct
                rows.append({"messages": [*question, {"role": "assistant", "content": answer}]})
            elif split in ("prefs", "prefs_eval"):
                rows.append({"prompt": question, "chosen": _reply(correct), "rejected": _reply(mistake(correct))})
            elif split == "eval":
                rows.append({"prompt": question, "completion": _reply(correct)})
            elif split in ("kto", "kto_eval"):
                desirable = rng.random() < DESIRABLE_RATE
                answer = correct if desirable else mistake(correct)
                rows.append({"prompt": question, "completion": _reply(answer), "label": desirable})
            else:
                rows.append({"prompt": question})
        splits[split] = rows
    for split, (source, family) in DERIVED_SPLITS.items():
        splits[split] = [row for row, item in zip(splits[source], items_of[source]) if item.family == family]
    return splits


def _reply(answer: str) -> list[dict]:
    return [{"role": "assistant", "content": answer}]


def data_key() -> str:
    """Short hash of everything the rows depend on; part of the cache folder's name."""
    parameters = [TASK_VERSION, SEED, MAX_DIGITS, PHRASINGS, ANSWERS, SPLIT_SIZES, MISTAKE_RATE, DESIRABLE_RATE]
    return hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()[:12]


def materialize(name: str, cache_root: Path | None = None) -> Path:
    """Write the built-in dataset ``name`` (e.g. ``builtin:parity/sft``) as JSON Lines; return its path.

    The file lives under ``cache_root or cache_dir()`` and is written once: a temporary file renamed
    into place, so concurrent callers see either no file or the whole file.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
    split = name.split("/", 1)[1]
    folder = Path(cache_root or cache_dir()) / f"parity-{data_key()}"
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
