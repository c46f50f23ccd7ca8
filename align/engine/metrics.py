"""Step metrics: one JSON line per logged step, plus a callback for whoever runs the stage; the
throughput and gradient norm every step record carries."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from align.engine.dist import all_reduce_sum

if TYPE_CHECKING:
    from align.tracking import StageTracker

MetricsCallback = Callable[[dict], None]


class MetricsLog:
    """Appends metric records to ``metrics.jsonl``; only the main rank writes, and hands each record to
    ``on_record`` and to the ``tracker`` of the job's ``report_to`` (:mod:`align.tracking`)."""

    def __init__(self, path: Path, write: bool, on_record: MetricsCallback | None = None,
                 tracker: StageTracker | None = None):
        self.path = Path(path)
        self.write = write
        self.on_record = on_record
        self.tracker = tracker
        self.records: list[dict] = []
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        record = {k: _plain(v) for k, v in record.items()}
        record.setdefault("time", round(time.time(), 3))
        self.records.append(record)
        if self.write:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.on_record is not None:
                self.on_record(record)
            if self.tracker is not None:
                self.tracker.log(record)

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run logs those steps again."""
        if self.write and self.tracker is not None:
            self.tracker.resumed_after(step)
        if not (self.write and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.records = [json.loads(line) for line in kept]


class Throughput:
    """Tokens (and, for stages that count them, samples) per second over the steps since the last
    reading, summed over ranks."""

    def __init__(self, samples: bool = False):
        self.counts_samples = samples
        self.start = time.perf_counter()
        self.tokens = 0
        self.samples = 0

    def add(self, tokens: int, samples: int = 0) -> None:
        self.tokens += tokens
        self.samples += samples

    def read(self) -> dict[str, float]:
        """``tokens_per_s`` (and ``samples_per_s``) since the last reading; every rank calls it."""
        now = time.perf_counter()
        tokens, samples = all_reduce_sum([float(self.tokens), float(self.samples)])
        elapsed = max(now - self.start, 1e-9)
        self.start, self.tokens, self.samples = now, 0, 0
        rates = {"tokens_per_s": tokens / elapsed}
        if self.counts_samples:
            rates["samples_per_s"] = samples / elapsed
        return rates


def means_over_ranks(keys: list[str], sums, count: float) -> dict:
    """``{key: sum over every rank / count}`` for the step's per-rank ``sums`` (a tensor or list, in the
    order of ``keys``)."""
    totals = all_reduce_sum(sums.tolist() if hasattr(sums, "tolist") else list(sums))
    return {key: value / count for key, value in zip(keys, totals)}


def grad_norm(engine) -> float:
    """The global gradient norm of the last optimizer step (NaN before the first)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
