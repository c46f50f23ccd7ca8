"""Checks a job before any training: the base model exists and every stage's data loads and fits its stage.

A bad file in the last stage fails the job before the first stage spends any compute. When the base
model's tokenizer can be loaded cheaply (tokenizer files only, never weights), a sample of each file's
conversational rows is also rendered with its chat template, so a template that cannot mark the
assistant's tokens fails here, naming the template and showing the rendered row.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from align.data import load
from align.spec import JobSpec

DATA_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "orpo": "preference", "simpo": "preference",
             "kto": "unpaired", "ppo": "prompt", "grpo": "prompt", "rloo": "prompt"}
TEMPLATE_SAMPLE_ROWS = 8
"""Rows rendered per file by the chat-template check: the first ones, plus the first row with a system
turn and the first with several assistant turns among the first ``TEMPLATE_SCAN_ROWS``."""
TEMPLATE_SCAN_ROWS = 1000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


Problem = tuple[str, str]
"""``(field, message)``: the spec field at fault and what is wrong with it."""


def check_job(job: JobSpec) -> None:
    """Raise the first problem :func:`job_errors` finds, as the stages read the files (``file://`` or a path as
    written): :class:`DataError` (:class:`TemplateError` for the chat template) or :class:`ModelError`,
    naming the stage's file, row and column."""
    for _field, _message, error in job_errors(job, _as_written):
        raise error


def job_problems(
    job: JobSpec, local: Callable[[str], str | None], *, model: bool = True, data: bool = True
) -> list[Problem]:
    """``(field, message)`` for each problem :func:`job_errors` finds (``align validate`` and POST /jobs)."""
    return [(field, message) for field, message, _error in job_errors(job, local, model=model, data=data)]


def job_errors(
    job: JobSpec, local: Callable[[str], str | None], *, model: bool = True, data: bool = True
) -> Iterator[tuple[str, str, Exception]]:
    """The problems of a job's base model and data, as ``(field, message, error)``, found without training.

    ``local`` maps a data or model location to the local path to read, or ``None`` for one left to the
    worker (a remote URL); ``builtin:`` and ``artifact:`` names never reach it. With ``model``, a local
    base model must be a model folder (nothing is loaded). With ``data``, each local file must load and
    have the columns its stage needs, a built-in dataset must exist, and when the base model's tokenizer
    loads from its files alone (:func:`chat_tokenizer`) a sample of the rows, built-in ones included, is
    rendered with its chat template: the first template error is reported on ``base_model``. Messages name
    a file as the spec wrote it, unless ``local`` read it elsewhere (a relative path taken from the
    spec's folder), where they name the file read."""
    model_path = None if job.base_model.startswith(("builtin:", "artifact:")) else local(job.base_model)
    if model_path is not None:
        # Imports torch and transformers (seconds, the first time): only for a local base model, so that a
        # job on a built-in or artifact model is checked without them.
        from align.models.load import ModelError, resolve_base_model
    if model and model_path is not None:
        try:
            resolve_base_model(_named(job.base_model, model_path))
        except ModelError as error:
            yield "base_model", str(error).removeprefix("base_model: "), error
    if not data:
        return
    tokenizer: list = []  # loaded on first use: [tokenizer or None]
    template_refused = False
    for index, stage in enumerate(job.stages):
        kind = DATA_KIND[stage.type]
        for key in ("path", "eval_path"):
            location, field = getattr(stage.data, key), f"stages[{index}].data.{key}"
            if location is None:
                continue
            builtin = location.startswith("builtin:")
            if builtin:
                from align.task import BUILTIN_DATASETS  # imports torch: only when needed

                if location not in BUILTIN_DATASETS:
                    message = f"unknown built-in dataset '{location}'; known: {', '.join(BUILTIN_DATASETS)}"
                    yield field, message, load.DataError(location, None, None, message)
                    continue
                path = named = location
            else:
                path = local(location)
                if path is None:
                    continue
                named = _named(location, path)
            if not tokenizer:
                tokenizer.append(None)
                if model_path is not None:
                    try:
                        tokenizer[0] = chat_tokenizer(job.base_model, model_path)
                    except ModelError as error:
                        yield "base_model", str(error).removeprefix("base_model: "), error
            if builtin and tokenizer[0] is None:
                continue  # built-in rows fit their stage; only a local model's template is worth rendering
            passed = None if builtin or tokenizer[0] is not None else _file_version(path, kind)
            if passed is not None and passed in _PASSED_FILES:
                continue
            try:
                rows = _builtin_sample(location) if builtin else load.load_rows(path)
                fmt = load.detect_format(rows, kind, path)
                load.validate_rows(rows, fmt, path, kind=kind)
                if tokenizer[0] is not None and not template_refused:
                    check_chat_template(rows, fmt, kind, tokenizer[0], path)
                if passed is not None:
                    _remember_passed(passed)
            except load.TemplateError as error:
                template_refused = True
                yield "base_model", str(error).replace(path, named, 1), error
            except load.DataError as error:
                yield field, str(error).replace(path, named, 1), error


PASSED_FILES_KEPT = 1024
_PASSED_FILES: dict[tuple, None] = {}
"""Files (by path, stage kind and the file's size, modification time and inode) that loaded and fitted their
stage without a template check: a sweep submits many jobs on one dataset, and reading it again with
``datasets`` costs tens of milliseconds per file. A file changed since reads as a new key."""


def _file_version(path: str, kind: str) -> tuple | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(found.st_mode):
        return None  # a save_to_disk folder: its files change without the folder's own times changing
    return (os.path.realpath(path), kind, found.st_size, found.st_mtime_ns, found.st_ctime_ns, found.st_ino)


def _remember_passed(version: tuple) -> None:
    if len(_PASSED_FILES) >= PASSED_FILES_KEPT:
        _PASSED_FILES.clear()
    _PASSED_FILES[version] = None


def _as_written(location: str) -> str:
    """The local path the stages read for a location (:func:`align.data.stage_data.resolve_data_path`)."""
    return location.removeprefix("file://")


def _named(location: str, path: str) -> str:
    """How messages name a file: the location as written where ``path`` is just it without ``file://``."""
    return location if path == location.removeprefix("file://") else path


def _builtin_sample(location: str):
    """The first rows of a built-in dataset, in memory (nothing is written); they are all alike."""
    import datasets

    from align.task import build_splits

    return datasets.Dataset.from_list(build_splits()[location.split("/", 1)[1]][:TEMPLATE_SAMPLE_ROWS])


def precision_warning(job: JobSpec) -> str | None:
    """The warning for an explicit bf16 on CPU workers (of any stage) when this machine's CPU only emulates bf16.

    Checked on the machine that runs the pre-flight (the workers of a local run); a stage also warns from
    the worker it runs on."""
    if job.deepspeed.precision != "bf16" or all(job.stage_resources(i).gpus_per_worker > 0
                                                 for i in range(len(job.stages))):
        return None
    from align.precision import resolve

    return resolve("bf16", "cpu").warning


def check_stage_data(stage, tokenizer=None) -> dict[str, int]:
    """Load and check one stage's data files; returns the row count of each (``path``, ``eval_path``).

    With ``tokenizer``, a sample of each file's rows is rendered with its chat template
    (:func:`check_chat_template`)."""
    from align.data.stage_data import resolve_data_path

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
    from align.data.order import total_steps

    counts = check_stage_data(stage, tokenizer)
    if stage.max_steps is not None:
        return stage.max_steps
    train_rows = counts["path"]
    if not stage.data.eval_path:
        train_rows -= round(stage.data.eval_fraction * train_rows)
    if stage.data.max_rows is not None:
        train_rows = min(train_rows, stage.data.max_rows)
    return total_steps(stage, train_rows, world_size)


def chat_tokenizer(base_model: str, folder: str | Path | None = None):
    """The base model's tokenizer, loaded from its tokenizer files alone, or ``None`` where there is
    nothing to check or it cannot be loaded cheaply here: a built-in model (its template is
    :data:`~align.data.templates.DEFAULT_CHAT_TEMPLATE`, whose ``{% generation %}`` blocks mark every
    assistant turn), an artifact (fetching one means checking every file of it), a remote location, a
    folder without tokenizer files. Where it is ``None`` the worker renders the rows when it tokenizes
    them, and a template error there fails the stage without a retry.

    ``folder`` is the local folder of ``base_model`` where the caller resolved it (a path relative to the
    spec's folder); by default it is ``base_model`` itself. Tokenizer files that cannot be read raise
    :class:`~align.models.load.ModelError` naming ``base_model``, the folder and the error."""
    if base_model.startswith(("builtin:", "artifact:")):
        return None
    if folder is None:
        match = _SCHEME_RE.match(base_model)
        if match and match.group(1).lower() != "file":
            return None
        folder = base_model[match.end():] if match else base_model
    folder = Path(folder).expanduser()
    if not folder.is_dir() or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from align.models.load import ModelError, load_tokenizer

    try:
        return load_tokenizer(folder)
    except Exception as error:  # transformers raises many types for unreadable tokenizer files
        raise ModelError(f"base_model: '{base_model}': cannot load its tokenizer from {folder}: "
                         f"{type(error).__name__}: {error}") from error


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
            elif kind == "unpaired":
                tokenize.tokenize_unpaired(row, fmt, tokenizer, max_length=1 << 30)
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

