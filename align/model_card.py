"""The model card (``README.md``) every stage artifact carries, and how an artifact names its base model.

The card is a Hugging Face model card: YAML front matter (``base_model``, ``library_name``, ``license``,
``pipeline_tag``, ``tags``, ``datasets``) and Markdown sections for the base model, the stages that led
to the artifact with their key hyperparameters, the data fingerprints, the final metrics, the lineage
and the precision. It replaces the empty template peft's ``save_pretrained`` writes, before the store
hashes the folder, so the manifest's sha256 covers the card as stored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from align.spec import JobSpec

CARD_FILE = "README.md"
LICENSE_UNKNOWN = "other"
"""Recorded when the base model's folder names no licence (job specs have no licence field)."""

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")

_COMMON_HYPERPARAMETERS = (
    "lr", "lr_scheduler", "warmup_ratio", "batch_size", "gradient_accumulation_steps", "epochs", "max_steps",
    "max_length", "seed",
)
_TYPE_HYPERPARAMETERS = {
    "sft": (),
    "rm": ("init",),
    "dpo": ("beta", "loss", "label_smoothing", "sft_weight", "reference", "eval_reward"),
    "orpo": ("beta", "eval_reward"),
    "simpo": ("beta", "gamma", "label_smoothing", "sft_weight", "eval_reward"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "reference", "eval_reward"),
    "ppo": ("reward", "kl_coef", "clip_eps", "ppo_epochs", "critic_lr", "max_new_tokens", "temperature"),
    "grpo": ("reward", "group_size", "kl_coef", "clip_eps", "max_new_tokens", "temperature"),
    "rloo": ("reward", "group_size", "kl_coef", "clip_eps", "max_new_tokens", "temperature"),
}
_ADAPTER_NAMES = {"lora": "LoRA adapter", "dora": "DoRA adapter", "ia3": "IA3 adapter",
                  "prefix": "prefix-tuning adapter", "prompt": "prompt-tuning adapter",
                  "bias": "bias-tuned (BitFit) model", "full": "fully fine-tuned model"}


def base_model_reference(base_model: str) -> str:
    """How an artifact names its base model: the spec's ``base_model``, in a form that loads from anywhere.

    ``builtin:tiny``, ``artifact:<id>`` and URLs such as ``file:///models/llama`` are kept as written, as
    are absolute paths and ``~/...`` (symlinks are not followed: a stable link stays the name). A relative
    path is made absolute against the working directory of the process that trains, since it would
    otherwise be read against whatever folder the reader runs in. Never the cache folder a name
    resolves to: ``builtin:tiny`` is rebuilt or found by its name on every machine.
    """
    if _SCHEME.match(base_model) or base_model.startswith("~") or os.path.isabs(base_model):
        return base_model
    return os.path.abspath(base_model)


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML block between the leading ``---`` lines of a model card; {} if it has none."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}
    data = yaml.safe_load(text[4:end])
    return data if isinstance(data, dict) else {}


def base_model_license(base_folder: Path | None) -> dict[str, str]:
    """``license`` (and ``license_name``/``license_link`` when given) from the base model's own model card.

    Hugging Face model folders carry their licence in ``README.md``'s front matter; a folder without one
    (such as ``builtin:tiny``) gives ``{"license": "other"}``: the licence is unknown to align.
    """
    card = Path(base_folder) / CARD_FILE if base_folder is not None else None
    try:
        front = read_front_matter(card.read_text(encoding="utf-8")) if card is not None else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        front = {}
    found = {key: str(front[key]) for key in ("license", "license_name", "license_link") if front.get(key)}
    return found if "license" in found else {"license": LICENSE_UNKNOWN}


def stage_hyperparameters(stage: Any) -> dict[str, Any]:
    """The settings that shape a stage's training most, by name, in a fixed order (unset ones left out)."""
    names = _COMMON_HYPERPARAMETERS + _TYPE_HYPERPARAMETERS.get(stage.type, ())
    values = {name: getattr(stage, name, None) for name in names}
    if values.get("max_steps") is not None:
        values.pop("epochs")
    return {name: value for name, value in values.items() if value is not None}


def front_matter(
    job: JobSpec, index: int, *, kind: str, data_fingerprints: dict[str, str], license: dict[str, str],
    base_model: str | None = None,
) -> dict[str, Any]:
    """The card's metadata, keys in the order they are written; ``base_model`` overrides the spec's (a job
    started from an artifact names the weights under it, as its ``adapter_config.json`` does)."""
    stage = job.stages[index]
    tags = ["align", stage.type, job.adapter.type] + (["reward-model"] if kind == "reward_model" else [])
    return {
        "base_model": base_model or base_model_reference(job.base_model),
        "library_name": "peft" if job.adapter.is_peft else "transformers",
        **license,
        "pipeline_tag": "text-classification" if kind == "reward_model" else "text-generation",
        "tags": tags,
        "datasets": list(data_fingerprints.values()),
    }


def render_model_card(
    job: JobSpec,
    index: int,
    *,
    kind: str,
    lineage: str,
    parents: list[str],
    data_fingerprints: dict[str, str],
    metrics: dict[str, Any],
    precision: dict[str, Any] | None,
    license: dict[str, str] | None = None,
    job_id: str | None = None,
    base_model: str | None = None,
    adapter_config: dict[str, Any] | None = None,
) -> str:
    """The text of ``README.md`` for the artifact stage ``index`` of ``job`` publishes; ``base_model`` as in
    :func:`front_matter`. ``adapter_config`` is the saved adapter's ``adapter_config.json`` where it is not the
    spec's ``adapter`` (a job continuing the adapter of ``base_model: artifact:<id>``): the card describes it."""
    license = license or {"license": LICENSE_UNKNOWN}
    meta = front_matter(job, index, kind=kind, data_fingerprints=data_fingerprints, license=license,
                        base_model=base_model)
    stage, name, base = job.stages[index], job.stage_names()[index], meta["base_model"]
    adapter_type = _config_type(adapter_config) if adapter_config else job.adapter.type
    what = _ADAPTER_NAMES[adapter_type]
    if kind == "reward_model":
        what = f"reward model ({what})"
    article = "An" if what[0] in "aeiouAEIOU" else "A"
    if not job.adapter.is_peft:
        trained = "its biases trained" if job.adapter.type == "bias" else "fine-tuned"
        weights = (f"The weights here are the whole model, {trained} from it: "
                   "`align.models.load.load_artifact` loads them.")
    else:
        weights = ("The weights here are an adapter on it: `align.models.load.load_artifact` loads both; with peft: "
                   "`PeftModel.from_pretrained(<the base model>, <this folder>)`.")
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"), "---", "",
        f"# {lineage}", "",
        f"{article} {what} on `{base}`, trained by align in stage `{name}` ({stage.type}) of job `{job.name}`.", "",
        "## Base model", "",
        f"`{base}`. {weights}", "",
        f"- adapter: {_continued_adapter_text(adapter_config, job) if adapter_config else _adapter_text(job)}",
        f"- quantization: {_quantization_text(job)}",
        f"- licence: {_license_text(license)}",
        *([f"- started from: `{job.base_model}`, the job's base_model"]
          if job.base_model.startswith("artifact:") and job.base_model != base else []),
        "", "## Stages", "",
        "| # | stage | type | key hyperparameters | artifact |",
        "|---|---|---|---|---|",
    ]
    for position in range(index + 1):
        earlier, earlier_name = job.stages[position], job.stage_names()[position]
        settings = ", ".join(f"{key}={_value(value)}" for key, value in stage_hyperparameters(earlier).items())
        output = "this artifact" if position == index else _parent_of(job, earlier_name, parents)
        lines.append(f"| {position} | {earlier_name} | {earlier.type} | {settings} | {output} |")

    lines += ["", "## Data fingerprints", "", "| data | location | fingerprint |", "|---|---|---|"]
    locations = {"train": stage.data.path, "eval": stage.data.eval_path}
    for data_name, fingerprint in data_fingerprints.items():
        lines.append(f"| {data_name} | `{locations.get(data_name) or '-'}` | `{fingerprint}` |")

    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_value(value)} |" for key, value in metrics.items()]
    else:
        lines.append("None recorded.")

    parent_refs = ", ".join(f"`artifact:{parent}`" for parent in parents) or "none"
    lines += [
        "", "## Lineage", "",
        f"- lineage: `{lineage}`",
        f"- job: `{job.name}`" + (f" (id `{job_id}`)" if job_id else ""),
        f"- spec hash: `{job.hash()}`",
        f"- parents: {parent_refs}",
        "", "## Precision", "",
    ]
    if precision:
        lines += [f"- {key}: {_value(value)}" for key, value in precision.items() if value is not None]
    else:
        lines.append("Not recorded.")
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, job: JobSpec, index: int, **details: Any) -> Path:
    """Write :func:`render_model_card` to ``folder/README.md``, replacing peft's template; return its path.

    A policy stage of a job on ``base_model: artifact:<id>`` of an adapter continues that adapter with its
    own settings, not the spec's: the card then describes the ``adapter_config.json`` in ``folder``, which
    names the base under that adapter (full weights named so are the base itself: a new adapter on them).
    """
    path = Path(folder) / CARD_FILE
    config_file = Path(folder) / "adapter_config.json"
    if job.base_model.startswith("artifact:") and details.get("kind") == "adapter" and config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("base_model_name_or_path") != job.base_model:
            details.setdefault("adapter_config", config)
    path.write_text(render_model_card(job, index, **details), encoding="utf-8")
    return path


def _parent_of(job: JobSpec, stage_name: str, parents: list[str]) -> str:
    prefix = f"{job.name}.{stage_name}-v"
    found = [f"`artifact:{parent}`" for parent in parents if parent.startswith(prefix)]
    return ", ".join(found) or "-"


def _adapter_text(job: JobSpec) -> str:
    adapter = job.adapter
    if adapter.type == "full":
        return "full fine-tuning (every weight trained)"
    if adapter.type == "bias":
        return "bias terms only (BitFit; every other weight is the base model's)"
    if adapter.is_prompt_learning:
        return _virtual_tokens_text(adapter.type, adapter.num_virtual_tokens, adapter.prompt_init_text)
    targets = adapter.target_modules
    if not isinstance(targets, str):
        targets = ", ".join(targets)
    if adapter.type == "ia3":
        default = " (peft's IA3 targets for the architecture)" if targets == "all-linear" else ""
        return f"ia3 targets={targets}{default}"
    text = f"{adapter.type} r={adapter.r} alpha={_value(adapter.alpha)} dropout={_value(adapter.dropout)}"
    text += f" targets={targets}"
    text += " rslora (scale alpha/sqrt(r))" if adapter.rslora else ""
    if adapter.init != "default":
        text += (f" init={adapter.init} (saved converted to a rank-{2 * adapter.r} LoRA adapter on the untouched "
                 "base model)")
    return text + (f" lora_plus_ratio={_value(adapter.lora_plus_ratio)}" if adapter.lora_plus_ratio else "")


def _config_type(config: dict[str, Any]) -> str:
    """The adapter type of a saved ``adapter_config.json``."""
    if config.get("peft_type") == "IA3":
        return "ia3"
    if config.get("peft_type") in ("PREFIX_TUNING", "PROMPT_TUNING"):
        return "prefix" if config["peft_type"] == "PREFIX_TUNING" else "prompt"
    return "dora" if config.get("use_dora") else "lora"


def _virtual_tokens_text(kind: str, virtual_tokens: int, init_text: str | None) -> str:
    """A prefix- or prompt-tuning adapter: its virtual tokens and, for prompt tuning, how they started (a long
    starting text cut to its first 200 characters)."""
    text = f"{kind} num_virtual_tokens={virtual_tokens}"
    if kind == "prompt" and init_text is not None:
        shown = init_text if len(init_text) <= 200 else init_text[:200] + "..."
        text += f" init=text {json.dumps(shown, ensure_ascii=False)}"
    elif kind == "prompt":
        text += " init=random"
    return text


def _continued_adapter_text(config: dict[str, Any], job: JobSpec) -> str:
    targets = config.get("target_modules") or []
    if not isinstance(targets, str):
        targets = ", ".join(sorted(targets))
    kind = _config_type(config)
    if kind in ("prefix", "prompt"):
        init_text = config.get("prompt_tuning_init_text") if config.get("prompt_tuning_init") == "TEXT" else None
        virtual = _virtual_tokens_text(kind, config.get("num_virtual_tokens"), init_text)
        return f"{virtual}, continued from `{job.base_model}`"
    if kind == "ia3":
        feedforward = ", ".join(sorted(config.get("feedforward_modules") or []))
        return f"ia3 targets={targets} feedforward={feedforward}, continued from `{job.base_model}`"
    rslora = " rslora (scale alpha/sqrt(r))" if config.get("use_rslora") else ""
    return (f"{kind} r={config.get('r')} alpha={_value(config.get('lora_alpha'))} "
            f"dropout={_value(config.get('lora_dropout'))} targets={targets}{rslora}, continued from "
            f"`{job.base_model}`")


def _quantization_text(job: JobSpec) -> str:
    q = job.quantization
    if q is None:
        return "none"
    return f"{q.bits}-bit" + (f" {q.type}, double_quant={q.double_quant}" if q.bits == 4 else "")


def _license_text(license: dict[str, str]) -> str:
    if license.get("license") == LICENSE_UNKNOWN and "license_name" not in license:
        return "unknown: the base model's folder names none; the base model's and the data's terms apply"
    return ", ".join(f"{key} {value}" for key, value in license.items())


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)
