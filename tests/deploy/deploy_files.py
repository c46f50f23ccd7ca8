"""Readers for the files under deploy/: the Dockerfile's instructions, and `align` command lines checked
against the CLI's own command tree (the click commands Typer builds)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int

    def words(self) -> list[str]:
        """The arguments as a list: the JSON (exec) form as written, the shell form split like a shell."""
        text = self.arguments.strip()
        if text.startswith("["):
            return json.loads(text)
        return shlex.split(text)


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions in order, with continuation lines joined and comments and parser directives dropped."""
    instructions, pending, start = [], "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return instructions


def expand(text: str, variables: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced from ``variables`` (the build arguments' defaults)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def resolve_align_command(args: list[str]) -> list[str]:
    """The names of the `align` (sub)command that ``args`` (without `align`) run, after click parsed every
    option and argument of each level as `align` itself would; raises the usage error `align` would print
    (Typer's click), or ValueError for a group given no subcommand."""
    import typer.main

    from services.cli import app

    command = typer.main.get_command(app)
    context = command.make_context("align", list(args), resilient_parsing=False)
    path = []
    while hasattr(command, "resolve_command"):  # a group
        rest = [*getattr(context, "_protected_args", []), *context.args]
        if not rest:
            raise ValueError(f"`align {' '.join(path)}` needs a subcommand")
        name, command, rest = command.resolve_command(context, rest)
        path.append(name)
        context = command.make_context(name, rest, parent=context, resilient_parsing=False)
    return path


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """The `ENV` of the last stage (the image that runs), as ``{name: value}``."""
    last_from = max(i for i, x in enumerate(instructions) if x.keyword == "FROM")
    env = {}
    for instruction in instructions[last_from:]:
        if instruction.keyword == "ENV":
            env |= dict(word.split("=", 1) for word in shlex.split(instruction.arguments))
    return env


def check_ray_start(args: list[str]) -> None:
    """Parse ``ray start ARGS`` with Ray's own click command; raises click's usage error on a wrong flag."""
    import warnings

    with warnings.catch_warnings():  # the import loads Ray Serve's models, written for pydantic 1
        warnings.simplefilter("ignore", DeprecationWarning)
        from ray.scripts.scripts import start

    start.make_context("ray start", list(args), resilient_parsing=False)
