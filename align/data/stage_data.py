"""A stage's rows: read from the spec's locations, checked, shuffled, split and tokenised."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.data import fingerprint, load
from align.data.tokenize import tokenize_dataset


def resolve_data_path(path: str) -> Path:
    """A local file for a spec's data location: a built-in dataset, a path, or a ``file://`` URL."""
    if path.startswith("builtin:"):
        from align.task import materialize

        return materialize(path)
    return Path(path.removeprefix("file://"))


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict]
    eval_rows: list[dict]
    """Held-out rows as loaded (before tokenising, ``_format`` added), for generation-based evaluation."""
    format: str
    fingerprints: dict[str, str]
    dropped: int
    """Training rows left out because truncation left nothing to learn from them."""


def load_stage_data(stage: Any, kind: load.Kind, tokenizer) -> StageData:
    """Load, check, split and tokenise a stage's rows. Bad rows raise :class:`DataError`.

    The training rows are shuffled with the stage seed; without ``eval_path`` the first
    ``eval_fraction`` of them are held out, and ``max_rows`` caps the rest. Prompts (``kind="prompt"``)
    are cut to leave ``max_new_tokens`` for the completion; preference prompts to ``max_prompt_length``.
    """
    spec = stage.data
    paths = {"train": resolve_data_path(spec.path)}
    if spec.eval_path:
        paths["eval"] = resolve_data_path(spec.eval_path)
    fingerprints = {name: fingerprint.file_fingerprint(p) for name, p in paths.items()}

    train_rows, fmt = _checked_rows(paths["train"], kind)
    random.Random(stage.seed).shuffle(train_rows)
    if "eval" in paths:
        eval_rows, eval_fmt = _checked_rows(paths["eval"], kind)
    else:
        eval_fmt = fmt
        held_out = round(spec.eval_fraction * len(train_rows))
        eval_rows, train_rows = train_rows[:held_out], train_rows[held_out:]
    if spec.max_rows is not None:
        train_rows = train_rows[: spec.max_rows]

    if kind == "prompt":
        max_prompt_length = stage.max_length - stage.max_new_tokens
    else:
        max_prompt_length = getattr(stage, "max_prompt_length", None)
    options = {"max_prompt_length": max_prompt_length, "truncation": stage.truncation}
    train, dropped = tokenize_dataset(train_rows, fmt, kind, tokenizer, stage.max_length, **options)
    evaluation, _ = tokenize_dataset(eval_rows, eval_fmt, kind, tokenizer, stage.max_length, **options)
    if not train:
        raise load.DataError(str(paths["train"]), None, None, "no usable rows after tokenisation; check max_length")
    for row in eval_rows:
        row["_format"] = eval_fmt
    return StageData(train, evaluation, eval_rows, fmt, fingerprints, dropped)


def _checked_rows(path: Path, kind: load.Kind) -> tuple[list[dict], load.Format]:
    """The rows of one file and their format, every row checked against it."""
    rows = load.load_rows(str(path))
    fmt = load.detect_format(rows, kind, str(path))
    load.validate_rows(rows, fmt, str(path), kind=kind)
    return list(rows), fmt
