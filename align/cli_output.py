"""What every ``align`` command prints through: one console, messages printed as they are, failures in
red with an exit code, and library warnings kept out of the output.

Every message that comes from the service, a spec or a data file is printed with rich markup off, so
text such as ``[a-z0-9]`` or ``[/data]`` prints as it is.
"""

from __future__ import annotations

import os
import warnings

import typer
from rich.console import Console

console = Console(width=int(os.environ.get("COLUMNS", "140")))


def say(text: str, style: str | None = None) -> None:
    """Print ``text`` as it is: no markup, no highlighting, no wrapping inside words."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def fail(text: str, code: int = 2) -> typer.Exit:
    """Print an error in red, as it is; raise the returned exit."""
    say(text, style="red")
    return typer.Exit(code)


LIBRARIES = r"(transformers|peft|torch|deepspeed|datasets|accelerate|bitsandbytes|huggingface_hub)(\.|$)"
"""Modules whose Python warnings a command does not show: what they warn about is theirs to fix, not the user's."""


def quiet_warnings() -> None:
    """Keep library warnings (transformers' FutureWarning, peft's UserWarning, ...) out of the command's
    output; a multi-worker stage's ranks write theirs to the stage's ``ranks.log``."""
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", module=LIBRARIES)
