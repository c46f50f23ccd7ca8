"""Checks on parsed JSON that the databases and JSON itself need: no NUL or lone surrogate in a string,
bounded nesting, and non-finite floats written in a form JSON can hold.

Python's ``json`` reads ``NaN``, ``Infinity`` and ``1e999`` as floats and ``"\\u0000"`` or ``"\\ud800"`` as
strings; Postgres refuses all of them in text and ``json`` columns, and a lone surrogate cannot even be
written back as UTF-8. The walks are iterative, so a deeply nested value cannot exhaust the stack.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 32
"""Deepest nesting of objects and lists a spec or a worker report may have."""
MAX_KEYS = 1000
"""Most fields one object may have: a flood of unknown fields is refused before it is validated field by field."""
NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
"""How :func:`finite_json` writes each non-finite float: as a string, the way JavaScript prints it."""


def _path(parent: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character (\\u0000); remove it"
    if any("\ud800" <= char <= "\udfff" for char in text):
        return "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send valid Unicode"
    return None


def unsafe_strings(data: Any, root: str = "") -> list[tuple[str, str]]:
    """(field, problem) for each string, key included, that cannot be stored, for nesting deeper than
    :data:`MAX_DEPTH` and for an object with more than :data:`MAX_KEYS` fields; fields are written as
    ``stages[0].data.path`` under ``root``."""
    problems: list[tuple[str, str]] = []
    stack: list[tuple[str, Any, int]] = [(root, data, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, str):
            problem = _string_problem(value)
            if problem:
                problems.append((where or "(body)", problem))
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            problems.append((where or "(body)", f"nested deeper than {MAX_DEPTH} levels; flatten it"))
            continue
        if isinstance(value, dict) and len(value) > MAX_KEYS:
            problems.append((where or "(body)", f"has {len(value)} fields; at most {MAX_KEYS} are read"))
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _string_problem(key):
                problems.append((_path(where, "?"), f"a field name {_string_problem(key)}"))
                continue
            stack.append((_path(where, key), item, depth + 1))
    return sorted(problems)


def finite_json(data: Any) -> Any:
    """``data`` with every NaN, Infinity and -Infinity float replaced by the string :data:`NON_FINITE`
    gives it (``"NaN"``, ``"Infinity"``, ``"-Infinity"``); other values are returned as they are."""
    if isinstance(data, float) and not math.isfinite(data):
        return NON_FINITE[repr(data)]
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list):
        return [finite_json(value) for value in data]
    return data
