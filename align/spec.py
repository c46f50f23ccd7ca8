"""The job spec: one schema for the CLI, the API, the workers and the docs.

A job trains one base model through a chain of stages. Each stage starts from the policy the latest
policy stage before it left (the adapter of an SFT, DPO, PPO, GRPO or RLOO stage), the first from the
base model or from the policy another job published (``base_model: artifact:<id>``); a reward-model
stage leaves a reward model beside the chain.
Unknown fields are refused, every field carries its own documentation, and the rules that tie
fields together are checked here so a bad job fails before it reaches a worker.

The settings shared by every stage live in :mod:`align.spec_parts`, the stages in :mod:`align.spec_stages`;
this module holds the job, its parsing and its errors, and exports every public name of the three.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from align.json_values import unsafe_strings
from align.spec_parts import (
    PEFT_ADAPTERS,
    WHOLE_MODEL_ADAPTERS,
    AdapterSpec,
    DataSpec,
    DeepSpeedSpec,
    QuantizationSpec,
    ResourcesSpec,
    SpecModel,
)
from align.spec_stages import (
    DEFAULT_GATE_METRIC,
    FINAL_METRICS,
    GENERATION_METRICS,
    MODEL_REWARD,
    ONLINE_STAGE_TYPES,
    PAIR_STAGE_TYPES,
    POLICY_STAGE_TYPES,
    STAGE_TYPES,
    DPOStage,
    GateSpec,
    GRPOStage,
    KTOStage,
    ORPOStage,
    PPOStage,
    RewardChoice,
    RewardModelStage,
    RewardName,
    SFTStage,
    SimPOStage,
    StageSpec,
)

__all__ = [
    "DEFAULT_GATE_METRIC",
    "FINAL_METRICS",
    "GENERATION_METRICS",
    "MODEL_REWARD",
    "ONLINE_STAGE_TYPES",
    "PAIR_STAGE_TYPES",
    "PEFT_ADAPTERS",
    "POLICY_STAGE_TYPES",
    "PRECISION_SUMMARY_PREFIX",
    "REPORT_TARGETS",
    "STAGE_TYPES",
    "WHOLE_MODEL_ADAPTERS",
    "AdapterSpec",
    "DPOStage",
    "DataSpec",
    "DeepSpeedSpec",
    "GRPOStage",
    "GateSpec",
    "JobSpec",
    "KTOStage",
    "ORPOStage",
    "PPOStage",
    "QuantizationSpec",
    "ResourcesSpec",
    "RewardChoice",
    "RewardModelStage",
    "RewardName",
    "SFTStage",
    "SimPOStage",
    "SpecError",
    "StageSpec",
    "load_spec",
    "parse_spec",
]

REPORT_TARGETS = ("tensorboard", "mlflow")
"""What ``report_to`` may name."""
HASH_OMITS_AT_DEFAULT: dict[str, Any] = {"report_to": []}
"""Job fields :meth:`JobSpec.hash` leaves out while they hold this default (their JSON form)."""
STAGE_HASH_OMITS_AT_DEFAULT: dict[str, Any] = {"padding_free": True, "gate": None, "resources": None}
"""Stage fields :meth:`JobSpec.hash` leaves out while they hold this default."""
GENERATION_EVAL_HASH_OMITS_AT_DEFAULT: dict[str, Any] = {
    "eval_reward": None, "reward_model": None, "max_new_tokens": 64, "temperature": 1.0, "eval_samples": 1,
}
"""Fields of the stages with ``eval_reward`` (dpo, orpo, simpo, kto) that :meth:`JobSpec.hash` leaves out while they
hold this default (online stages had ``max_new_tokens`` and ``temperature`` from the start)."""
ADAPTER_HASH_OMITS_AT_DEFAULT: dict[str, Any] = {"rslora": False, "init": "default", "num_virtual_tokens": 20,
                                                 "prompt_init_text": None}
"""``adapter`` fields :meth:`JobSpec.hash` leaves out while they hold this default."""
MAX_REPORTED_ERRORS = 50
"""Most problems a :class:`SpecError` lists; a spec with more gets a count of the rest."""
PRECISION_SUMMARY_PREFIX = "precision "
"""How a stage's first message begins: the precision it trains in and why (``align.precision``)."""


class JobSpec(SpecModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    """Job name: lower-case letters, digits, `.`, `_`, `-`. Names the artifact lineages."""
    base_model: str
    """`builtin:tiny`, a local Hugging Face model folder (safetensors), or `artifact:<id>`: a policy another of your
    jobs published (an sft, dpo, orpo, simpo, kto, ppo, grpo or rloo stage's artifact, not a reward model). The
    first stage then starts from that policy: an adapter is continued (on the base model it names, with its own rank
    and targets; `adapter.type` must not be `full` or `bias`), full weights become the base a new adapter or full
    fine-tuning trains. DPO's reference is that policy, and the first stage's artifact lists it as its parent.
    `align train` and `align validate` look the id up in the local artifact store."""
    adapter: AdapterSpec = AdapterSpec()
    """How the policy trains: LoRA, DoRA, IA3, prefix or prompt tuning, its biases only (BitFit) or full
    fine-tuning."""
    quantization: QuantizationSpec | None = None
    """Quantise the frozen base weights (QLoRA). Unset: no quantisation."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """DeepSpeed engine settings shared by every stage."""
    resources: ResourcesSpec = ResourcesSpec()
    """Workers per stage and what each one gets."""
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(default=[])
    """Where each stage's training and evaluation metrics go besides `metrics.jsonl`, as Hugging Face's
    `report_to`: `tensorboard` (event files in the artifact's `tb/`), `mlflow` (a run per stage on the MLflow
    tracking server of `ALIGN_MLFLOW_TRACKING_URI`, its id in the manifest). A name or a list; `all` is
    both, `none` (or `[]`) neither."""
    stages: list[StageSpec] = Field(min_length=1, max_length=16)
    """The stages, run in order."""

    @field_validator("base_model")
    @classmethod
    def _base_model_form(cls, value: str) -> str:
        if value.startswith(("http://", "https://", "hf://")):
            raise ValueError(
                f"'{value}' is a remote location; give a local model folder, builtin:tiny or artifact:<id>"
            )
        if value.startswith("builtin:") and value != "builtin:tiny":
            raise ValueError(f"unknown built-in model '{value}'; the built-in model is builtin:tiny")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> JobSpec:
        q, ds, adapter = self.quantization, self.deepspeed, self.adapter
        if q is not None and ds.zero_stage == 3:
            raise ValueError(
                "quantization: not supported with deepspeed.zero_stage=3: ZeRO-3 shards parameters across "
                "ranks and quantised weights cannot be sharded; use zero_stage 0-2 or drop quantization"
            )
        if q is not None and not adapter.is_peft:
            raise ValueError(
                f"quantization: not possible with adapter.type='{adapter.type}'"
                ": quantised base weights are frozen; "
                "use adapter.type 'lora', 'dora' or 'ia3', or drop quantization"
            )
        if q is not None and adapter.init != "default":
            raise ValueError(
                f"adapter.init: '{adapter.init}' rewrites the base weights it starts from, which quantised weights "
                "cannot be without changing the model (peft refuses PiSSA on them); use init: default with "
                "quantization, or drop quantization"
            )
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError(
                "deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3; raise zero_stage or set it false"
            )
        names = self.stage_names()
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"stages[{i}].name: '{name}' is used twice; give each stage its own name")
        for i, stage in enumerate(self.stages):
            if stage.type in ONLINE_STAGE_TYPES:
                self._check_online_stage(i, stage)
            self._check_reward_model(i, stage, "eval_reward")
            if (problem := adapter.stage_problem(stage.type, f"stages[{i}]")) is not None:
                raise ValueError(problem)
            if stage.type in ONLINE_STAGE_TYPES and not adapter.is_peft:
                raise ValueError(
                    f"stages[{i}].type: '{stage.type}' needs adapter.type 'lora', 'dora' or 'ia3' (got "
                    f"'{adapter.type}'): its reference is the starting adapter kept frozen beside the trained one"
                )
            self._check_gate_parent(i, stage)
            prompt_limit = getattr(stage, "max_prompt_length", None)
            if prompt_limit is not None and prompt_limit >= stage.max_length:
                raise ValueError(
                    f"stages[{i}].max_prompt_length: {prompt_limit} must be below max_length ({stage.max_length})"
                )
        return self

    def _check_reward_model(self, i: int, stage: Any, choice: str) -> None:
        """A stage whose ``choice`` field (``reward``, ``eval_reward``) is ``model`` needs a reward model: the one
        its ``reward_model`` names, else the latest rm stage's before it."""
        earlier_rm = any(s.type == "rm" for s in self.stages[:i])
        if getattr(stage, choice, None) == MODEL_REWARD and stage.reward_model is None and not earlier_rm:
            raise ValueError(
                f"stages[{i}].reward_model: {choice} '{MODEL_REWARD}' needs a reward model; add an rm stage "
                "before this one or set reward_model: artifact:<id>"
            )

    def _check_online_stage(self, i: int, stage: Any) -> None:
        self._check_reward_model(i, stage, "reward")
        if getattr(stage, "critic_init", None) == "reward_model" and stage.reward != MODEL_REWARD:
            raise ValueError(
                f"stages[{i}].critic_init: 'reward_model' needs reward '{MODEL_REWARD}'; "
                f"set critic_init: policy to train a critic with the '{stage.reward}' reward"
            )

    def _check_gate_parent(self, i: int, stage: Any) -> None:
        """``min_delta_vs_parent`` on an sft stage compares with the previous sft stage's artifact (or the
        ``base_model: artifact:<id>`` it continues); an rm stage has no parent reward model."""
        if stage.gate is None or stage.gate.min_delta_vs_parent is None:
            return
        field = f"stages[{i}].gate.min_delta_vs_parent"
        if stage.type == "rm":
            raise ValueError(f"{field}: an rm stage's parent is a policy, which reports no reward-model metrics; "
                             "use min or max")
        if stage.type != "sft":
            return
        earlier = [s.type for s in self.stages[:i] if s.type in POLICY_STAGE_TYPES]
        if earlier and earlier[-1] != "sft":
            raise ValueError(f"{field}: this sft stage continues a {earlier[-1]} stage, whose "
                             f"'{stage.gate.metric}' measures something else; use min or max")
        if not earlier and not self.base_model.startswith("artifact:"):
            raise ValueError(f"{field}: this sft stage starts from the base model, which has no "
                             f"'{stage.gate.metric}' to compare with; use min or max")

    def stage_resources(self, index: int) -> ResourcesSpec:
        """The workers stage ``index`` runs on: its own ``resources``, else the job's."""
        return self.stages[index].resources or self.resources

    def stage_names(self) -> list[str]:
        """Each stage's name: its own, else its type, numbered when the type repeats."""
        counts = {t: sum(s.type == t for s in self.stages) for t in STAGE_TYPES}
        return [s.name or (s.type if counts[s.type] == 1 else f"{s.type}-{i}") for i, s in enumerate(self.stages)]

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_names(cls, value: Any) -> Any:
        """``tensorboard``, ``[mlflow, tensorboard]``, ``all``, ``none``: as a list without repeats."""
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            return value  # pydantic names the wrong type
        if names in (["none"], []):
            return []
        if names == ["all"]:
            return list(REPORT_TARGETS)
        for name in names:
            if name in ("all", "none"):
                raise ValueError(f"report_to: '{name}' stands alone; give it as report_to: {name}")
            if name not in REPORT_TARGETS:
                raise ValueError(f"report_to: '{name}' is not supported; use {', '.join(REPORT_TARGETS)}, a list "
                                 "of them, all or none")
        return list(dict.fromkeys(names))

    def hash(self) -> str:
        """Content hash of the spec (canonical JSON, defaults filled). Fields added after specs were first
        stored (:data:`HASH_OMITS_AT_DEFAULT`, :data:`ADAPTER_HASH_OMITS_AT_DEFAULT`,
        :data:`STAGE_HASH_OMITS_AT_DEFAULT`, :data:`GENERATION_EVAL_HASH_OMITS_AT_DEFAULT`) are left out while at
        their default, so a spec that does not use them keeps the hash it had before they existed (stored jobs'
        ``spec_hash`` and idempotency keys)."""
        import hashlib

        data = self.model_dump(mode="json")
        stage_omits = [(stage, STAGE_HASH_OMITS_AT_DEFAULT) for stage in data["stages"]]
        stage_omits += [(stage, GENERATION_EVAL_HASH_OMITS_AT_DEFAULT)
                        for stage in data["stages"] if "eval_reward" in stage]
        for fields, defaults in [(data, HASH_OMITS_AT_DEFAULT), (data["adapter"], ADAPTER_HASH_OMITS_AT_DEFAULT),
                                 *stage_omits]:
            for name, default in defaults.items():
                if name in fields and fields[name] == default:
                    del fields[name]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


class SpecError(ValueError):
    """A job spec that does not validate; ``errors`` lists (field, message) pairs."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        where = f"{source}: " if source else ""
        super().__init__(where + "invalid job spec\n" + "\n".join(f"  {f}: {m}" for f, m in errors))


def _field_path(loc: tuple) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        # A discriminated union puts the tag into the location (stages.1.dpo.beta): drop it.
        if i > 0 and loc[i - 1] != "stages" and isinstance(loc[i - 1], int) and item in STAGE_TYPES:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(spec)"


def _message(error: dict) -> str:
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if error["type"] == "union_tag_invalid":
        return f"unknown stage type {error.get('input', {}).get('type')!r}; use one of {', '.join(STAGE_TYPES)}"
    if error["type"] == "missing":
        return "required field is missing"
    if error["type"] == "int_parsing_size":
        return f"{error['input']!r} is far too large; docs/spec.md gives each field's range"
    if error["type"] != "value_error" and "input" in error and not isinstance(error["input"], (dict, list)):
        return f"{msg} (got {error['input']!r})"
    return msg


def parse_spec(data: Any, source: str | None = None) -> JobSpec:
    """Validate a parsed spec, turning pydantic's errors into a :class:`SpecError` that names each field
    (the first :data:`MAX_REPORTED_ERRORS` of them)."""
    unsafe = unsafe_strings(data)
    if unsafe:
        raise SpecError(unsafe[:MAX_REPORTED_ERRORS], source)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = []
        found = exc.errors()
        for e in found[:MAX_REPORTED_ERRORS]:
            msg = _message(e)
            where = _field_path(e["loc"])
            # Rules across fields name their field at the start of the message.
            m = re.match(r"^((?:stages\[\d+\]\.)?[a-z_]+(?:\.[a-z_]+)?): (.*)$", msg, re.S)
            if m:
                prefix = where if where.startswith("stages[") and not m.group(1).startswith("stages[") else ""
                errors.append(((prefix + "." if prefix else "") + m.group(1), m.group(2)))
            else:
                errors.append((where, msg))
        if len(found) > MAX_REPORTED_ERRORS:
            errors.append(("(spec)", f"{len(found) - MAX_REPORTED_ERRORS} more problems not listed; fix these first"))
        raise SpecError(errors, source) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a job spec from a YAML or JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError([("(file)", f"no such file: {path}")]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SpecError([("(file)", f"not valid {kind}: {exc}")], str(path)) from exc
    if not isinstance(data, dict):
        raise SpecError([("(spec)", "expected a mapping of fields at the top level")], str(path))
    return parse_spec(data, str(path))
