"""Live progress of a job's stages, one bar each: state, step/total, loss, time since the stage started, ETA.

``align train`` feeds it from the stages it runs in this process and ``align submit --follow`` from the
service's event stream; both show the same columns. Every text printed through it goes out with rich
markup off, so a message holding ``[a-z0-9]`` or ``[/data]`` prints as it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from datetime import datetime, timezone

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text

SHOWN_KEYS = ("loss", "eval_loss", "eval_exact_match", "eval_rewards_accuracy")
"""Metrics shown beside a stage's bar, from its latest record that has them."""
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
NOTE_WIDTH = 72
"""Characters of a stage's latest message shown on its bar before its first step."""


def fmt(value) -> str:
    """A metric value, short: four significant digits, thousands without decimals."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def epoch_seconds(timestamp: str | None) -> float | None:
    """Seconds since the epoch of an ISO 8601 time from the API (a time without an offset is UTC)."""
    if not timestamp:
        return None
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StageElapsedColumn(ProgressColumn):
    """Wall-clock time since the stage started (not since this view opened), frozen when the stage ends."""

    def render(self, task: Task) -> Text:
        started = task.fields.get("started")
        if started is None:
            return Text("-:--:--", style="progress.elapsed")
        return Text(clock((task.fields.get("ended") or time.time()) - started), style="progress.elapsed")


class StageProgress:
    """One bar per stage, keyed by anything hashable (a stage name, a stage run id).

    Use it as a context manager; between ``start`` and ``end`` of a stage feed it ``step`` calls, and
    print other lines through ``print`` so they appear above the bars.
    """

    def __init__(self, console: Console):
        columns = (
            TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.fields[steps]:>11}"),
            TextColumn("{task.fields[state]:<10} {task.fields[info]}", markup=False), StageElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=console, transient=False)
        self.bars: dict[Hashable, int] = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __contains__(self, key: Hashable) -> bool:
        return key in self.bars

    def name(self, key: Hashable) -> str:
        return self.progress.tasks[self.bars[key]].description

    def total(self, key: Hashable) -> int | None:
        total = self.progress.tasks[self.bars[key]].total
        return int(total) if total else None

    def add(self, key: Hashable, name: str, state: str = "queued", *, total: int | None = None, step: int = 0,
            started: float | None = None, ended: float | None = None) -> None:
        """A bar for a stage; ``started`` and ``ended`` are seconds since the epoch, when known."""
        self.bars[key] = self.progress.add_task(name, total=total, completed=step, state=state, info="",
                                                steps=_steps(step, total), started=started, ended=ended)

    def start(self, key: Hashable, *, started: float | None = None, total: int | None = None,
              state: str = "running") -> None:
        """The stage started at ``started`` (default now); ``total`` is its planned number of steps."""
        bar = self.bars[key]
        self.progress.reset(bar, total=total or self.total(key), state=state, started=started or time.time(),
                            ended=None, steps=_steps(0, total or self.total(key)), info="")

    def set_total(self, key: Hashable, total: int | None) -> None:
        if total:
            step = int(self.progress.tasks[self.bars[key]].completed)
            self.progress.update(self.bars[key], total=total, steps=_steps(step, total))

    def step(self, key: Hashable, record: dict) -> None:
        """A metrics record of the stage: moves the bar to its ``step`` and shows its loss and held-out scores."""
        bar = self.bars[key]
        if "step" in record:
            self.progress.update(bar, completed=record["step"], steps=_steps(record["step"], self.total(key)))
        shown = {k: record[k] for k in SHOWN_KEYS if k in record}
        if shown:
            self.progress.update(bar, info="  ".join(f"{k}={fmt(v)}" for k, v in shown.items()))

    def note(self, key: Hashable, text: str) -> None:
        """What a stage that has not stepped yet is doing (building the built-in model, ...), where its loss
        goes once it steps."""
        bar = self.bars[key]
        if not self.progress.tasks[bar].completed:
            self.progress.update(bar, info=text if len(text) <= NOTE_WIDTH else text[:NOTE_WIDTH - 1] + "…")

    def state(self, key: Hashable, state: str, *, at: float | None = None) -> None:
        """A new state; a final one (succeeded, failed, cancelled) stops the stage's clock at ``at``."""
        fields = {"ended": at or time.time()} if state in TERMINAL_STATES else {}
        self.progress.update(self.bars[key], state=state, **fields)

    def end(self, key: Hashable, state: str = "succeeded", *, steps: int | None = None) -> None:
        """The stage ended in this process; a successful one fills its bar (``steps`` done of ``steps``)."""
        if steps:
            self.progress.update(self.bars[key], total=steps, completed=steps, steps=_steps(steps, steps))
        self.state(key, state)

    def print(self, text: str, style: str | None = None) -> None:
        """A line above the bars, printed as it is (markup off: brackets stay)."""
        self.progress.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def show(self, renderable: RenderableType) -> None:
        """A table or other renderable above the bars."""
        self.progress.console.print(renderable)


def _steps(step: int, total: int | None) -> str:
    return f"{step}/{total or '?'}"
