"""Load a base model and its tokenizer, or a published artifact on the base it names: safetensors only, never
remote code, never a hub download."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.data.templates import DEFAULT_CHAT_TEMPLATE
from align.models.weights import folder_weights_problem
from align.spec import QuantizationSpec


class ModelError(ValueError):
    """A base model that cannot be used; the message says which and why."""


def resolve_base_model(
    base_model: str, progress: Callable[[str], None] | None = None, artifact_root: str | None = None
) -> Path:
    """Turn a spec's ``base_model`` into a local model folder. ``progress`` hears how building
    ``builtin:tiny`` goes when it is not yet cached (a minute or two).

    ``artifact:<id>`` (a policy another job published, fetched and checked from the store at
    ``artifact_root``, default ``align.paths.artifact_root()``) gives the weights under that policy: the
    base model its adapter names, or the artifact's own folder after full fine-tuning. The adapter itself
    is the stage's start policy (:func:`align.lineage.stage_inputs`)."""
    if base_model == "builtin:tiny":
        from align.tiny import build_tiny

        return build_tiny(progress=progress)
    if base_model.startswith("artifact:"):
        folder = _base_artifact_folder(base_model, artifact_root)
        if (folder / "adapter_config.json").is_file():
            return resolve_base_model(artifact_base_model(folder), progress, artifact_root)
        return folder
    path = Path(base_model.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise ModelError(f"base_model: '{base_model}' is not a local model folder; give a folder with config.json")
    if not (path / "config.json").is_file():
        raise ModelError(f"base_model: '{base_model}' has no config.json; is it a Hugging Face model folder?")
    problem = folder_weights_problem(path)
    if problem is not None:
        raise ModelError(f"base_model: '{base_model}' {problem}")
    return path


def artifact_folder(reference: str | Path, artifact_root: str | None = None) -> Path:
    """A local folder holding an artifact: ``artifact:<id>`` is fetched (and checked) from the store at
    ``artifact_root`` (default ``align.paths.artifact_root()``); a path is used as it is."""
    if isinstance(reference, str) and reference.startswith("artifact:"):
        from align.artifacts import ArtifactStore
        from align.paths import artifact_root as default_root

        return ArtifactStore(artifact_root or default_root()).download(reference)
    folder = Path(str(reference).removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise ModelError(f"artifact '{reference}' is not a folder; give artifact:<id> or an artifact's folder")
    return folder


def _base_artifact_folder(base_model: str, artifact_root: str | None) -> Path:
    from align.artifacts import ArtifactError

    try:
        return artifact_folder(base_model, artifact_root)
    except ArtifactError as error:
        raise ModelError(f"base_model: '{base_model}': {error}") from None


def adapter_base_reference(base_model: str, artifact_root: str | None = None) -> str:
    """How a stage's adapter names the weights it sits on (``base_model_name_or_path``, the card's
    ``base_model``): the spec's base model (:func:`align.model_card.base_model_reference`); for
    ``artifact:<id>`` of an adapter, the base model that adapter names, since the adapter a job continues
    holds the whole policy on that base; for ``artifact:<id>`` of full weights, the artifact itself."""
    from align.model_card import base_model_reference

    if base_model.startswith("artifact:"):
        folder = _base_artifact_folder(base_model, artifact_root)
        if (folder / "adapter_config.json").is_file():
            return artifact_base_model(folder)
    return base_model_reference(base_model)


def artifact_base_model(folder: Path) -> str:
    """How an adapter artifact names its base model: ``base_model_name_or_path`` of its ``adapter_config.json``
    (``builtin:tiny``, a path, ...), as :func:`align.model_card.base_model_reference` recorded it."""
    config_file = Path(folder) / "adapter_config.json"
    try:
        base_model = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ModelError(f"artifact {folder}: cannot read adapter_config.json: {error}") from None
    if not base_model:
        raise ModelError(f"artifact {folder}: adapter_config.json names no base_model_name_or_path")
    return base_model


def load_artifact(
    reference: str | Path, dtype: torch.dtype = torch.float32, artifact_root: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A published artifact ready to use (eval mode, frozen) and its tokenizer.

    ``reference`` is ``artifact:<id>`` or the artifact's folder. An adapter is loaded on the base model its
    ``adapter_config.json`` names, resolved like a spec's ``base_model`` (``builtin:tiny`` finds or builds the
    built-in model); a fully fine-tuned artifact is the whole model. Reward models (``kind: reward_model``)
    come back as sequence-classification models with their head.
    """
    from peft import PeftModel

    from align.models.reward import load_frozen_reward_model

    folder = artifact_folder(reference, artifact_root)
    adapter = (folder / "adapter_config.json").is_file()
    base = folder
    if adapter:
        try:
            base = resolve_base_model(artifact_base_model(folder), artifact_root=artifact_root)
        except ModelError as error:
            raise ModelError(f"artifact {folder}: the base model its adapter_config.json names: {error}") from None
    tokenizer = load_tokenizer(folder)
    if artifact_kind(folder) == "reward_model":
        model = load_frozen_reward_model(base, folder, dtype, tokenizer.pad_token_id, None)
    else:
        model = load_causal_lm(base, dtype)
        if adapter:
            model = PeftModel.from_pretrained(model, folder, is_trainable=False)
    model.requires_grad_(False)
    return model.eval(), tokenizer


def artifact_kind(folder: Path) -> str:
    """The artifact's kind (``adapter``, ``full``, ``reward_model``): its manifest's, else read from its files
    (a folder not yet published): an adapter for sequence classification, or a model whose architecture
    is one, is a reward model. Raises :class:`ModelError` for a folder with neither adapter nor model."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())["kind"]
    if (folder / "adapter_config.json").is_file():
        task_type = json.loads((folder / "adapter_config.json").read_text()).get("task_type")
        return "reward_model" if task_type == "SEQ_CLS" else "adapter"
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} is not an artifact's folder: it holds no manifest.json, adapter_config.json "
                         "or config.json")
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    return "reward_model" if any(a.endswith("ForSequenceClassification") for a in architectures) else "full"


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bnb_config(q: QuantizationSpec, compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _load(auto_class, path: Path, dtype: torch.dtype, quantization: QuantizationSpec | None, **kwargs):
    options = dict(trust_remote_code=False, local_files_only=True, use_safetensors=True, dtype=dtype, **kwargs)
    if quantization is not None:
        options["quantization_config"] = _bnb_config(quantization, dtype)
        options["device_map"] = {"": _device()}
    model = auto_class.from_pretrained(path, **options)
    if quantization is not None:
        disable_bnb_cpu_inference_repack(model)
        if options["device_map"][""] == "cpu":
            release_weight_files(model)
    return model


def _device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def load_causal_lm(path: Path, dtype: torch.dtype, quantization: QuantizationSpec | None = None) -> PreTrainedModel:
    return _load(AutoModelForCausalLM, path, dtype, quantization)


def load_reward_model(
    path: Path, dtype: torch.dtype, pad_token_id: int, quantization: QuantizationSpec | None = None
) -> PreTrainedModel:
    """The base model with a one-output sequence-classification head (the reward)."""
    model = _load(AutoModelForSequenceClassification, path, dtype, quantization, num_labels=1)
    model.config.pad_token_id = pad_token_id
    return model


def release_weight_files(model: torch.nn.Module) -> int:
    """Copy a quantised model's unquantised tensors (embeddings, norms, head) out of the weight files, so
    that the files' memory maps close. Returns the number of tensors copied.

    On a CPU those tensors are views of the mapped safetensors files, and the quantisation has read every
    page of the files: while any view lives, the whole files' full-precision weights stay resident beside
    the quantised ones (a 56M-parameter Llama in fp32: 221 MiB of file pages besides 37 MiB of 4-bit
    weights).
    """
    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.__class__.__name__ not in ("Params4bit", "Int8Params"):
                    param.data = param.data.clone()
                    copied += 1
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    module._buffers[name] = buffer.clone()
                    copied += 1
    return copied


def disable_bnb_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their training kernel on CPUs with AVX512-BF16.

    A ``Linear4bit`` called without gradients in ``eval()`` mode (a reference pass, ``generate``)
    otherwise repacks its weight for an inference kernel that has no autograd; backward passes after
    that give wrong LoRA gradients with only a warning. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
