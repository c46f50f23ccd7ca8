"""The job-spec reference in Markdown, made from the docstrings of the spec models (:mod:`align.spec`)."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from align import spec

SECTIONS = [
    ("Job", spec.JobSpec),
    ("adapter", spec.AdapterSpec),
    ("quantization", spec.QuantizationSpec),
    ("deepspeed", spec.DeepSpeedSpec),
    ("resources", spec.ResourcesSpec),
    ("stages[].data", spec.DataSpec),
    ("stages[].gate", spec.GateSpec),
    ("Stage `sft`", spec.SFTStage),
    ("Stage `rm`", spec.RewardModelStage),
    ("Stage `dpo`", spec.DPOStage),
    ("Stage `orpo`", spec.ORPOStage),
    ("Stage `simpo`", spec.SimPOStage),
    ("Stage `kto`", spec.KTOStage),
    ("Stage `ppo`", spec.PPOStage),
    ("Stage `grpo` / `rloo`", spec.GRPOStage),
]


def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        names = dict.fromkeys(_type_name(a) for a in args if a is not type(None))
        return " or ".join(names)
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is Annotated:
        return _type_name(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping (below)" if annotation.__name__ != "JobSpec" else "mapping"
    return getattr(annotation, "__name__", str(annotation))


_BOUND_SIGNS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _bounds(field) -> str:
    """``, ≥ 1, ≤ 10000000`` for a field with bounds; empty for one without."""
    signs = [f"{sign} {getattr(item, name):g}" if isinstance(getattr(item, name), float)
             else f"{sign} {getattr(item, name)}"
             for item in field.metadata for name, sign in _BOUND_SIGNS.items() if hasattr(item, name)]
    return "".join(f", {sign}" for sign in signs)


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "required"
    value = field.default
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value!r}`" if value is not None else "unset"


def render_markdown() -> str:
    lines = [
        "# Job spec reference",
        "",
        "Generated from `align/spec.py`, `spec_parts.py` and `spec_stages.py` (`align spec-docs`); a test keeps "
        "it in step with the code.",
        "Unknown fields are refused. YAML and JSON carry the same fields. Numbers must lie in the range the type "
        "column gives, and floats must be finite (no `NaN` or `Infinity`).",
        "",
    ]
    for title, model in SECTIONS:
        lines += [f"## {title}", ""]
        if model.__doc__ and title.startswith("Stage"):
            lines += [model.__doc__.strip(), ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            kind = _type_name(field.annotation) + _bounds(field)
            lines.append(f"| `{name}` | {kind} | {_default(field)} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
