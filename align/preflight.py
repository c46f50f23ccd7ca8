"""Checks a job before any training: the base model exists and every stage's data loads and fits its stage.

A bad file in the last stage fails the job before the first stage spends any compute. When the base
model's tokenizer can be loaded cheaply (tokenizer files only, never weights), a sample of each file's
conversational rows is also rendered with its chat template, so a template that cannot mark the
assistant's tokens fails here, naming the template and showing the rendered row.
"""

from __future__ import annotations

import re
from pathlib import Path

from align.data import load
from align.spec import JobSpec

DATA_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompt", "grpo": "prompt", "rloo": "prompt"}
TEMPLATE_SAMPLE_ROWS = 8
"""Rows rendered per file by the chat-template check: the first ones, plus the first row with a system
turn and the first with several assistant turns among the first ``TEMPLATE_SCAN_ROWS``."""
TEMPLATE_SCAN_ROWS = 1000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_job(job: JobSpec, *, check_model: bool = True) -> None:
    """Raise :class:`DataError` (:class:`TemplateError` for the chat template) or :class:`ModelError`
    naming the stage's file, row and column."""
    tokenizer = None
    if check_model:
        from align.models.load import ModelError

        if not job.base_model.startswith(("builtin:", "artifact:")):
            from align.models.load import resolve_base_model

            resolve_base_model(job.base_model)
        try:
            tokenizer = chat_tokenizer(job.base_model)
        except Exception as error:  # tokenizer files that transformers cannot read, whatever the error type
            raise ModelError(f"base_model: '{job.base_model}': cannot load its tokenizer: {error}") from error
    for stage in job.stages:
        check_stage_data(stage, tokenizer)


def precision_warning(job: JobSpec) -> str | None:
    """The warning for an explicit bf16 on CPU workers when this machine's CPU only emulates bf16.

    Checked on the machine that runs the pre-flight (the workers of a local run); a stage also warns from
    the worker it runs on."""
    if job.deepspeed.precision != "bf16" or job.resources.gpus_per_worker > 0:
        return None
    from align.precision import resolve

    return resolve("bf16", "cpu").warning


def check_stage_data(stage, tokenizer=None) -> dict[str, int]:
    """Load and check one stage's data files; returns the row count of each (``path``, ``eval_path``).

    With ``tokenizer``, a sample of each file's rows is rendered with its chat template
    (:func:`check_chat_template`)."""
    from align.stages.common import resolve_data_path

    kind = DATA_KIND[stage.type]
    counts = {}
    for field, location in (("path", stage.data.path), ("eval_path", stage.data.eval_path)):
        if location:
            path = str(resolve_data_path(location))
            rows = load.load_rows(path)
            fmt = load.detect_format(rows, kind, path)
            load.validate_rows(rows, fmt, path, kind=kind)
            if tokenizer is not None:
                check_chat_template(rows, fmt, kind, tokenizer, path)
            counts[field] = len(rows)
    return counts


def planned_steps(stage, world_size: int, tokenizer=None) -> int:
    """Check the stage's data (:func:`check_stage_data`) and return the optimizer steps it will take: its
    ``max_steps``, else what its training rows give; rows the stage later drops as too long can make it
    end a little earlier."""
    from align.stages.common import total_steps

    counts = check_stage_data(stage, tokenizer)
    if stage.max_steps is not None:
        return stage.max_steps
    train_rows = counts["path"]
    if not stage.data.eval_path:
        train_rows -= round(stage.data.eval_fraction * train_rows)
    if stage.data.max_rows is not None:
        train_rows = min(train_rows, stage.data.max_rows)
    return total_steps(stage, train_rows, world_size)


def chat_tokenizer(base_model: str):
    """The base model's tokenizer, loaded from its tokenizer files alone, or ``None`` where there is
    nothing to check or it cannot be loaded cheaply here: a built-in model (its template is
    :data:`~align.data.templates.DEFAULT_CHAT_TEMPLATE`, whose ``{% generation %}`` blocks mark every
    assistant turn), an artifact (fetching one means checking every file of it), a remote location, a
    folder without tokenizer files. Where it is ``None`` the worker renders the rows when it tokenizes
    them, and a template error there fails the stage without a retry."""
    if base_model.startswith(("builtin:", "artifact:")):
        return None
    match = _SCHEME_RE.match(base_model)
    if match and match.group(1).lower() != "file":
        return None
    folder = Path(base_model[match.end():] if match else base_model).expanduser()
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from align.models.load import load_tokenizer

    return load_tokenizer(folder)


def check_chat_template(rows, fmt: load.Format, kind: load.Kind, tokenizer, path: str) -> None:
    """Tokenize a sample of conversational rows as training will; raise :class:`TemplateError` at the
    first the chat template cannot render or mark, located at its file and row."""
    from align.data import tokenize

    for index in _sample_rows(rows, fmt):
        row = rows[index]
        if tokenize.is_text_row(row, fmt):
            continue
        try:
            if kind == "sft":
                tokenize.tokenize_sft(row, fmt, tokenizer, max_length=1 << 30)
            elif kind == "preference":
                tokenize.tokenize_preference(row, fmt, tokenizer, max_length=1 << 30)
            else:
                tokenize.tokenize_prompt(row, fmt, tokenizer)
        except load.TemplateError as error:
            raise error.at(path, index) from None


def _sample_rows(rows, fmt: load.Format) -> list[int]:
    sample = list(range(min(TEMPLATE_SAMPLE_ROWS, len(rows))))
    if fmt in ("prompt", "preference"):
        return sample
    with_system = several_replies = None
    for index in range(min(TEMPLATE_SCAN_ROWS, len(rows))):
        messages = [m for value in rows[index].values() if isinstance(value, list) for m in value]
        roles = [message.get("role") for message in messages if isinstance(message, dict)]
        if with_system is None and "system" in roles:
            with_system = index
        if several_replies is None and roles.count("assistant") > 1:
            several_replies = index
    extra = [index for index in (with_system, several_replies) if index is not None and index not in sample]
    return sample + sorted(set(extra))

