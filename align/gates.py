"""Evaluation gates: whether a stage's final metric meets the condition its spec's ``gate`` sets.

A gate is decided where the stage publishes (:func:`align.stages.artifact.publish`), so the local runner
and the service read the same result from the artifact's manifest (``gate``). The artifact is published
whether the gate passes or not; what stops is the job.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from align.spec import GateSpec


@dataclass(frozen=True)
class GateResult:
    metric: str
    value: float | None
    """The stage's final value of ``metric`` (None when it never logged one, or logged NaN or infinity)."""
    baseline: float | None
    """The parent policy's value, for ``min_delta_vs_parent`` (None otherwise, or when there was none)."""
    passed: bool
    reason: str
    """One line: what was compared with what."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GateFailed(Exception):
    """A stage's gate did not pass; ``results`` are the stages run so far, the failed one last."""

    def __init__(self, stage: str, gate: dict[str, Any], results: list):
        super().__init__(f"stage {stage}: gate failed: {gate['reason']}")
        self.stage, self.gate, self.results = stage, gate, results


def check_gate(gate: GateSpec, value: float | None, baseline: float | None = None) -> GateResult:
    """Every condition the gate sets must hold: ``value >= min``, ``value <= max``, ``value - baseline >=
    min_delta_vs_parent``. A missing or non-finite value fails, as does a delta with no baseline."""
    failed, held = [], []

    def compare(ok: bool, text: str) -> None:
        (held if ok else failed).append(text)

    name = gate.metric
    if baseline is not None and not math.isfinite(baseline):
        baseline = None
    if value is None or not math.isfinite(value):
        said = "missing: the stage never measured it" if value is None else f"{value}, not a number to compare"
        return GateResult(name, None, baseline, False, f"{name} is {said}")
    if gate.min is not None:
        compare(value >= gate.min, f"{name} {value:.4g} {'>=' if value >= gate.min else '<'} min {gate.min:g}")
    if gate.max is not None:
        compare(value <= gate.max, f"{name} {value:.4g} {'<=' if value <= gate.max else '>'} max {gate.max:g}")
    if gate.min_delta_vs_parent is not None:
        if baseline is None:
            compare(False, f"the parent policy's {name} is unknown, so min_delta_vs_parent cannot be checked")
        else:
            delta, need = value - baseline, gate.min_delta_vs_parent
            compare(delta >= need, f"{name} {value:.4g} vs the parent's {baseline:.4g}: change {delta:+.4g} "
                                   f"{'>=' if delta >= need else '<'} min_delta_vs_parent {need:+g}")
    return GateResult(name, value, baseline, not failed, "; ".join(failed or held))


def starting_value(records: list[dict], metric: str) -> float | None:
    """The starting policy's ``metric`` from the stage's step-0 evaluation record, if it made one."""
    for record in records:
        if record.get("step") == 0 and metric in record:
            return record[metric]
    return None
