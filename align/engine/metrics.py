"""Step metrics: one JSON line per logged step, plus a callback for whoever runs the stage."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

MetricsCallback = Callable[[dict], None]


class MetricsLog:
    """Appends metric records to ``metrics.jsonl``; only the main rank writes."""

    def __init__(self, path: Path, write: bool, on_record: MetricsCallback | None = None):
        self.path = Path(path)
        self.write = write
        self.on_record = on_record
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

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run logs those steps again."""
        if not (self.write and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.records = [json.loads(line) for line in kept]


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
