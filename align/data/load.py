"""Reading users' dataset files and checking them before any tokenizing.

Column conventions follow TRL, so files prepared for TRL work unchanged:

| format | kind | columns |
|---|---|---|
| ``messages`` | sft | ``messages``: a list of ``{"role", "content"}`` ending with an assistant turn |
| ``prompt_completion`` | sft | ``prompt`` and ``completion``: strings, or lists of messages |
| ``preference`` | preference | ``prompt``, ``chosen``, ``rejected``: strings |
| ``preference_conversational`` | preference | ``chosen``, ``rejected``: lists of messages; ``prompt`` (optional) |
| ``prompt`` | prompt | ``prompt``: a string or a list of messages |
| ``unpaired`` | unpaired | ``prompt``, ``completion`` (strings or lists of messages), ``label`` (true: desirable) |

An unpaired dataset (KTO) may also be a preference dataset: each pair gives two rows, the chosen
answer desirable and the rejected one undesirable (as TRL's ``unpair_preference_dataset`` does).

Without a ``prompt``, the shared leading turns of ``chosen`` and ``rejected`` are the prompt.

A prompt-kind dataset (generation, evaluation) may also be in any of the other formats; the prompt is
taken from it and the completion or chosen answer kept as a reference.

Tokenising follows TRL too (:mod:`align.data.tokenize`): lists of messages go through the chat
template, plain strings do not (the reply gets the EOS token appended), so a file trains the same
sequence here as in TRL.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

import datasets

Kind = Literal["sft", "preference", "prompt", "unpaired"]
Format = Literal["messages", "prompt_completion", "preference", "preference_conversational", "prompt", "unpaired"]

ROLES = ("system", "user", "assistant")
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ACCEPTED_COLUMNS: dict[Kind, str] = {
    "sft": "{'messages'} or {'prompt', 'completion'}",
    "preference": "{'prompt', 'chosen', 'rejected'} or {'chosen', 'rejected'} with lists of messages",
    "prompt": "{'prompt'}, {'messages'}, {'prompt', 'completion'} or {'prompt', 'chosen', 'rejected'}",
    "unpaired": "{'prompt', 'completion', 'label'} or a preference dataset ({'prompt', 'chosen', 'rejected'})",
}


class DataError(ValueError):
    """A dataset file that cannot be used, with where the problem is and how to fix it.

    ``row`` is the 0-based index of the data row in the file (a CSV header is not a row) and ``column``
    the column name; either is ``None`` when the problem is not tied to one row or column.
    """

    def __init__(self, path: str, row: int | None, column: str | None, problem: str, fix: str = ""):
        self.path = path
        self.row = row
        self.column = column
        self.problem = problem
        self.fix = fix
        where = str(path)
        if row is not None:
            where += f" row {row}"
        if column is not None:
            where += f" column {column!r}"
        super().__init__(f"{where}: {problem}" + (f"; {fix}" if fix else ""))

    def __reduce__(self):
        # Raised in a Ray Train worker, the error is pickled back to the entrypoint, which must see its type.
        return type(self), (self.path, self.row, self.column, self.problem, self.fix)


class TemplateError(DataError):
    """The tokenizer's chat template cannot render a row, or cannot mark the assistant's tokens in it.

    ``template`` names the template (:func:`align.data.templates.template_name`) and ``sample`` is the
    rendered row with the span that would be trained on marked. Raised while tokenizing, where the file
    and row are unknown; :meth:`at` gives the same error located in a file.
    """

    def __init__(
        self, template: str, problem: str, fix: str = "", sample: str = "", path: str = "", row: int | None = None
    ):
        self.template = template
        self.sample = sample
        self.template_problem = problem
        super().__init__(path, row, None, f"the {template} {problem}", fix)
        message = self.args[0] if path else f"The {template} {problem}" + (f"; {fix}" if fix else "")
        self.args = (f"{message}\n{sample}" if sample else message,)

    def __reduce__(self):
        return type(self), (self.template, self.template_problem, self.fix, self.sample, self.path, self.row)

    def at(self, path: str, row: int | None) -> "TemplateError":
        return TemplateError(self.template, self.template_problem, self.fix, self.sample, path, row)


def load_rows(path: str) -> datasets.Dataset:
    """Read a local dataset file into memory.

    Accepts JSON Lines (``.jsonl``), JSON (``.json``: a list of objects, or JSON Lines), Parquet
    (``.parquet``), CSV (``.csv``) and folders written by ``Dataset.save_to_disk`` (for a
    ``DatasetDict`` the ``train`` split is used). Nothing is left in the Hugging Face cache.
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(
            path, None, None, "no such file or folder", "check the path and that the file was uploaded"
        )
    if os.path.isdir(path):
        return _load_saved_dataset(path)
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_LOADERS:
        accepted = ", ".join(FILE_LOADERS)
        raise DataError(
            path,
            None,
            None,
            f"unsupported file type {extension or '(none)'!r}",
            f"use one of {accepted} or a folder written by Dataset.save_to_disk",
        )
    with tempfile.TemporaryDirectory(prefix="align-data-") as cache_dir, _quiet_datasets():
        try:
            dataset = datasets.load_dataset(
                FILE_LOADERS[extension],
                data_files=path,
                split="train",
                cache_dir=cache_dir,
                keep_in_memory=True,
            )
        except Exception as error:  # the loaders raise many types; all mean the file cannot be parsed
            raise DataError(
                path,
                None,
                None,
                f"cannot be read as {extension[1:]}: {_root_message(error)}",
                "check that the file is valid and every row has the same columns",
            ) from error
    return dataset


def _load_saved_dataset(path: str) -> datasets.Dataset:
    markers = {"dataset_info.json", "state.json", "dataset_dict.json"}
    if not markers & set(os.listdir(path)):
        raise DataError(
            path,
            None,
            None,
            "is a folder but not one written by Dataset.save_to_disk",
            "pass a .jsonl, .json, .parquet or .csv file, or a save_to_disk folder",
        )
    with _quiet_datasets():
        loaded = datasets.load_from_disk(path, keep_in_memory=True)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(
                path,
                None,
                None,
                f"holds splits {sorted(loaded)} but no 'train' split",
                "save the split to train on as 'train'",
            )
        loaded = loaded["train"]
    return loaded


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Hide the loaders' progress bars for small local files, restoring the caller's setting."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _root_message(error: BaseException) -> str:
    """The innermost cause's message: ``datasets`` wraps parser errors in a generic one."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def detect_format(dataset: datasets.Dataset, kind: Kind, path: str) -> Format:
    """Pick the row format from the column names (and, for preference data, the ``chosen`` type)."""
    columns = set(dataset.column_names)

    def missing(column: str) -> DataError:
        return DataError(
            path,
            None,
            column,
            f"missing column (the file has {sorted(columns)})",
            f"a {kind} dataset needs columns {ACCEPTED_COLUMNS[kind]}",
        )

    if kind == "sft":
        if "messages" in columns:
            return "messages"
        if "prompt" in columns:
            if "completion" not in columns:
                raise missing("completion")
            return "prompt_completion"
        raise missing("messages")
    if kind == "unpaired" and not {"chosen", "rejected"} & columns:
        for column in ("prompt", "completion", "label"):
            if column not in columns:
                raise missing(column)
        return "unpaired"
    if kind in ("preference", "unpaired"):
        for column in ("chosen", "rejected"):
            if column not in columns:
                raise missing(column)
        if _holds_text(dataset, "chosen"):
            if "prompt" not in columns:
                raise missing("prompt")
            return "preference"
        return "preference_conversational"
    if kind == "prompt":
        if {"chosen", "rejected"} <= columns:
            if "prompt" in columns and _holds_text(dataset, "chosen"):
                return "preference"
            return "preference_conversational"
        if "prompt" in columns:
            return "prompt_completion" if "completion" in columns else "prompt"
        if "messages" in columns:
            return "messages"
        raise missing("prompt")
    raise ValueError(f"unknown dataset kind {kind!r}; expected one of 'sft', 'preference', 'prompt', 'unpaired'")


def _holds_text(dataset: datasets.Dataset, column: str) -> bool:
    """Whether a column holds strings (as opposed to lists of messages), judged by its first non-null value."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return True
    for value in dataset[:100][column]:
        if value is not None:
            return isinstance(value, str)
    return False


def validate_rows(dataset: datasets.Dataset, fmt: Format, path: str, kind: Kind = "sft") -> None:
    """Check the type of every value in every row; raise ``DataError`` at the first bad one.

    ``kind`` matters only for ``messages`` rows: an SFT conversation must end with an assistant turn,
    while as a prompt it needs at least one turn before any final assistant reply.
    """
    for row_index, row in enumerate(dataset):
        _validate_row(row, fmt, kind, path, row_index)


def _validate_row(row: dict[str, Any], fmt: Format, kind: Kind, path: str, row_index: int) -> None:
    def check(column: str, problem: str | None, fix: str) -> None:
        if problem is not None:
            raise DataError(path, row_index, column, problem, fix)

    if fmt == "messages":
        messages = row["messages"]
        check("messages", _message_list_problem(messages), _MESSAGES_FIX)
        if kind == "sft":
            check("messages", _last_role_problem(messages), "end each conversation with the reply to learn")
        elif messages[-1]["role"] == "assistant" and len(messages) == 1:
            check("messages", "has only an assistant turn, so there is no prompt", "add the user turn")
    elif fmt in ("prompt_completion", "prompt", "unpaired"):
        check("prompt", _text_or_messages_problem(row["prompt"]), _TEXT_FIX)
        if fmt == "unpaired":
            label = row["label"]
            check("label", None if isinstance(label, bool) else f"expected true or false, got {_describe(label)}",
                  "give true for a desirable completion and false for an undesirable one")
        if fmt != "prompt" and (kind != "prompt" or row["completion"] is not None):
            completion = row["completion"]
            check("completion", _text_or_messages_problem(completion), _TEXT_FIX)
            if isinstance(completion, list):
                check("completion", _reply_problem(completion), "make the completion assistant turns")
    elif fmt == "preference":
        for column in ("prompt", "chosen", "rejected"):
            check(column, _text_problem(row[column]), "give a non-empty string in every row")
    elif fmt == "preference_conversational":
        for column in ("chosen", "rejected"):
            check(column, _message_list_problem(row[column]), _MESSAGES_FIX)
            check(column, _last_role_problem(row[column]), "end each answer with an assistant turn")
        if row.get("prompt") is not None:
            check("prompt", _message_list_problem(row["prompt"]), _MESSAGES_FIX)
            for column in ("chosen", "rejected"):
                check(
                    column, _reply_problem(row[column]), "with a 'prompt' column, give only the reply turns"
                )
        else:
            prompt, _, _ = split_implicit_prompt(row["chosen"], row["rejected"])
            check(
                "chosen",
                None if prompt else "shares no leading turns with 'rejected', so there is no prompt",
                "start 'chosen' and 'rejected' with the same user turn, or add a 'prompt' column",
            )
    else:
        raise ValueError(f"unknown format {fmt!r}")


_MESSAGES_FIX = "give a list of {'role': 'system'|'user'|'assistant', 'content': <non-empty string>}"
_TEXT_FIX = "give a non-empty string or a list of messages"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    return f"{type(value).__name__} {json.dumps(value, default=str)[:60]}"


def _text_problem(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    return f"expected a non-empty string, got {_describe(value)}"


def _text_or_messages_problem(value: Any) -> str | None:
    if isinstance(value, str):
        return _text_problem(value)
    if isinstance(value, list):
        return _message_list_problem(value)
    return f"expected a string or a list of messages, got {_describe(value)}"


def _message_list_problem(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages, got {_describe(value)}"
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {index}: expected an object with 'role' and 'content', got {_describe(message)}"
        if message.get("role") not in ROLES:
            return f"message {index}: role {message.get('role')!r} is not one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"message {index}: expected 'content' to be a non-empty string, got {_describe(content)}"
    return None


def _reply_problem(messages: list[dict[str, Any]]) -> str | None:
    """A reply follows the prompt's generation prompt, so it must open with an assistant turn."""
    first_role = messages[0]["role"]
    if first_role != "assistant":
        return f"the reply starts with a {first_role!r} message, not 'assistant'"
    return _last_role_problem(messages)


def _last_role_problem(messages: list[dict[str, Any]]) -> str | None:
    last_role = messages[-1]["role"]
    return None if last_role == "assistant" else f"the last message is from {last_role!r}, not 'assistant'"


def split_implicit_prompt(
    chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Split two conversations into their shared leading turns (the prompt) and the two replies.

    Assistant turns at the end of the shared part go back to the replies, so each reply starts with
    an assistant turn even when both answers begin the same way.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same_message(chosen[shared], rejected[shared]):
        shared += 1
    while shared > 0 and chosen[shared - 1]["role"] == "assistant":
        shared -= 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _same_message(first: dict[str, Any], second: dict[str, Any]) -> bool:
    return first["role"] == second["role"] and first["content"] == second["content"]
