"""Datasets: load a user's file, check its rows, tokenize them (conversations with the chat template,
plain text as TRL does), and batch them.

    dataset = load_rows(path)
    fmt = detect_format(dataset, "preference", path)
    validate_rows(dataset, fmt, path, kind="preference")
    features, dropped = tokenize_dataset(dataset, fmt, "preference", tokenizer, max_length=1024)
    batch = collate_preference(features[:8], tokenizer.pad_token_id)

Names are imported on first use, so ``import align.data.templates`` or ``align.data.fingerprint``
does not pull in ``datasets``, ``transformers`` or ``torch``.
"""

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "load",
    "TemplateError": "load",
    "Format": "load",
    "Kind": "load",
    "load_rows": "load",
    "detect_format": "load",
    "validate_rows": "load",
    "ensure_chat_template": "tokenize",
    "tokenize_sft": "tokenize",
    "tokenize_preference": "tokenize",
    "tokenize_prompt": "tokenize",
    "tokenize_dataset": "tokenize",
    "is_text_row": "tokenize",
    "render_conversation": "render",
    "pad_sequences": "collate",
    "collate_sft": "collate",
    "collate_preference": "collate",
    "collate_prompts": "collate",
    "file_fingerprint": "fingerprint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
