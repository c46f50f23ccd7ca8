"""Hand a policy artifact on as a Hugging Face model folder that loads without align.

``export_artifact`` writes the folder:

- with ``merge``, an adapter artifact (LoRA, DoRA, QLoRA, IA3) is merged into its base model and saved as
  plain safetensors weights with their ``config.json``: ``AutoModelForCausalLM.from_pretrained(folder)``
  loads it. A QLoRA adapter trained on 4-bit weights is merged into those weights dequantised, the
  weights its training saw, not into the original full-precision ones;
- without ``merge``, the adapter (``adapter_model.safetensors``, ``adapter_config.json``): peft's
  ``PeftModel.from_pretrained(<base model>, folder)`` loads it;
- a fully fine-tuned or bias-trained artifact's weights are the model already and are copied as they are.

A PiSSA or OLoRA adapter was saved as a plain LoRA adapter on the untouched base
(:func:`align.models.adapters.lora_from_mutated_init`), so it merges like any other. A prefix- or
prompt-tuning adapter has nothing to merge (its virtual tokens are inputs, not a change of weights): it is
exported as the adapter, and ``merge`` is refused.

Every export carries the artifact's tokenizer with its chat template and a model card (``README.md``):
the artifact's own card (stages, data fingerprints, final metrics, lineage, precision) with front matter
for the exported form and an ``Export`` section naming the artifact it came from.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from align.artifact_manifest import MANIFEST, REWARD_MODEL_KIND
from align.model_card import CARD_FILE, read_front_matter
from align.spec import QuantizationSpec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
FULL_SKIPPED = {MANIFEST, CARD_FILE, "metrics.jsonl", "samples.jsonl"}
"""Files of a full artifact that are not part of the model folder (the card is written anew)."""
_QUANTIZATION_LINE = re.compile(
    r"^- quantization: (?P<bits>[48])-bit(?: (?P<type>nf4|fp4), double_quant=(?P<dq>\w+))?$", re.M
)
"""The card's quantisation line (``align.model_card``), the one record of QLoRA training an artifact has."""


class ExportError(ValueError):
    """An artifact that cannot be exported as asked; the message says why and what would work."""


def export_artifact(
    folder: Path, dest: Path, *, merge: bool = False, dtype: str = "auto", artifact_root: str | None = None
) -> Path:
    """Write the artifact in ``folder`` to ``dest`` (new or empty) as a Hugging Face model folder; return it.

    ``dtype`` is what merged weights are saved in: ``auto`` keeps the base model's own (its config's
    ``torch_dtype``, fp32 when it names none), else ``fp32``, ``bf16`` or ``fp16``. ``artifact_root`` is the
    store a base model named ``artifact:<id>`` is read from. Raises :class:`ExportError` for a reward model,
    an unknown dtype, ``merge`` of a prefix- or prompt-tuning adapter, and when ``dest`` holds files.
    """
    folder, dest = Path(folder), Path(dest)
    if dtype != "auto" and dtype not in DTYPES:
        raise ExportError(f"dtype: '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    from align.models.load import ModelError, artifact_kind

    manifest = _manifest(folder)
    adapter = (folder / "adapter_config.json").is_file()
    try:
        kind = artifact_kind(folder)
    except ModelError as error:
        raise ExportError(str(error)) from None
    if kind == REWARD_MODEL_KIND:
        raise ExportError(f"artifact {manifest.get('artifact_id', folder)} is a reward model; export exports "
                          "policies (an sft, dpo, orpo, simpo, kto, ppo, grpo or rloo stage's artifact)")
    if adapter and merge and (method := _prompt_learning_method(folder)) is not None:
        raise ExportError(f"artifact {manifest.get('artifact_id', folder)} is a {method} adapter: its virtual "
                          "tokens go in front of every input and change no weight, so there is no merged model "
                          "to write; export it without --merge (merge=False), as the adapter that "
                          "PeftModel.from_pretrained loads on the base model")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} is not empty; give a new or empty folder")
    staging = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if adapter and merge:
            form = _write_merged(folder, staging, dtype, artifact_root)
        elif adapter:
            for name in ADAPTER_FILES:
                shutil.copy2(folder / name, staging / name)
            form = "adapter"
        else:
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name not in FULL_SKIPPED:
                    shutil.copy2(path, staging / path.name)
            form = "full"
        _write_tokenizer(folder, staging)
        _write_card(folder, staging, manifest, form)
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def merged_model(folder: Path, base_folder: Path) -> torch.nn.Module:
    """The adapter artifact in ``folder`` merged into its base model, the model folder ``base_folder``, in fp32.

    For QLoRA the base is quantised from the dtype the stage loaded it in (the manifest's precision): 4-bit
    codes of bf16 weights differ from those of the fp32 weights for some of them. Its dequantised weights,
    the ones the adapter trained on, are what the adapter is merged into."""
    from peft import PeftModel

    from align.models.load import load_causal_lm
    from align.precision import DTYPES as TRAINING_DTYPES

    quantization = card_quantization(folder)
    if quantization is None:
        base = load_causal_lm(base_folder, torch.float32)
    else:
        precision = (_manifest(folder).get("precision") or {}).get("precision", "fp32")
        base = load_causal_lm(base_folder, TRAINING_DTYPES[precision], quantization).dequantize().float()
    model = PeftModel.from_pretrained(base, folder, is_trainable=False)
    return model.merge_and_unload().eval()


PROMPT_LEARNING_METHODS = {"PREFIX_TUNING": "prefix-tuning", "PROMPT_TUNING": "prompt-tuning"}
"""peft types of the adapters that add virtual tokens instead of changing weights, and what to call them."""


def _prompt_learning_method(folder: Path) -> str | None:
    """What the adapter in ``folder`` is when it adds virtual tokens (prefix or prompt tuning); else None."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return PROMPT_LEARNING_METHODS.get(config.get("peft_type"))


def card_quantization(folder: Path) -> QuantizationSpec | None:
    """The quantisation the artifact's base was trained under, as its model card records it; None for none."""
    card = Path(folder) / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    match = _QUANTIZATION_LINE.search(text)
    if match is None:
        return None
    if match["bits"] == "8":
        return QuantizationSpec(bits=8)
    return QuantizationSpec(bits=4, type=match["type"], double_quant=match["dq"] == "True")


def _write_merged(folder: Path, out: Path, dtype: str, artifact_root: str | None) -> str:
    from align.models.load import artifact_base_model, resolve_base_model

    # Resolved once: an artifact:<id> base is fetched and its files hashed on every resolution.
    base_folder = resolve_base_model(artifact_base_model(folder), artifact_root=artifact_root)
    model = merged_model(folder, base_folder)
    if dtype == "auto":
        base_config = json.loads((base_folder / "config.json").read_text())
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(base_config.get("torch_dtype") or base_config.get("dtype"),
                                                             "fp32")
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out, safe_serialization=True)
    return f"merged ({dtype})"


def _write_tokenizer(folder: Path, out: Path) -> None:
    from align.models.load import load_tokenizer

    load_tokenizer(folder).save_pretrained(out)


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_card(folder: Path, out: Path, manifest: dict, form: str) -> None:
    """The artifact's card with front matter for the exported form and an Export section."""
    card = folder / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    meta = read_front_matter(text)
    body = text.split("\n---\n", 1)[1].lstrip("\n") if meta else text
    merged = form.startswith("merged")
    if (folder / "adapter_config.json").is_file():
        meta["base_model"] = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    if merged or form == "full":
        meta["library_name"] = "transformers"
        meta["base_model_relation"] = "merge" if merged else "finetune"
    else:
        meta["base_model_relation"] = "adapter"
    meta["tags"] = list(meta.get("tags", [])) + (["merged"] if merged else [])
    if merged:
        how = ("The adapter is merged into the base model's weights: "
               "`AutoModelForCausalLM.from_pretrained(<this folder>)` loads it, with no adapter library.")
    elif form == "full":
        how = "The weights are the whole model: `AutoModelForCausalLM.from_pretrained(<this folder>)` loads it."
    else:
        how = ("The weights are an adapter: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
               f"<{meta.get('base_model', 'the base model')}>), <this folder>)` loads it.")
    export = [
        "", "## Export", "",
        f"- artifact: `{manifest.get('artifact_id', folder.name)}`",
        f"- content hash: `{manifest.get('content_hash', 'unknown')}`",
        f"- parents: {', '.join(f'`artifact:{p}`' for p in manifest.get('parents', [])) or 'none'}",
        f"- form: {form}",
        "", how, "",
    ]
    import yaml

    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n")
    (out / CARD_FILE).write_text(f"---\n{front}\n---\n\n{body.rstrip()}\n" + "\n".join(export), encoding="utf-8")


def archive_path(cache: Path, name: str) -> Path:
    """Where :func:`export_archive` keeps the archive of ``name``."""
    return Path(cache) / f"{name}.tar"


def export_archive(folder: Path, cache: Path, name: str, artifact_root: str | None = None) -> Path:
    """An uncompressed tar of the merged export of the artifact in ``folder`` (:func:`export_artifact` with
    ``merge``), members under ``<name>/``; built once into :func:`archive_path` and reused.

    A build holds an exclusive lock on ``<cache>/.<name>.lock``: a concurrent call for the same archive (a
    second request, another API process on the same disk) waits and returns the archive the build made,
    rather than loading the model again. The archive is written and synced beside its place and renamed
    into it, so the path never holds part of one."""
    import fcntl
    import os
    import tarfile
    import uuid

    archive = archive_path(cache, name)
    if archive.is_file():
        return archive
    Path(cache).mkdir(parents=True, exist_ok=True)
    with open(Path(cache) / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file():
            return archive
        scratch = Path(cache) / f".{name}.{uuid.uuid4().hex}"
        try:
            model = export_artifact(folder, scratch / name, merge=True, artifact_root=artifact_root)
            partial = scratch / "export.tar"
            with open(partial, "wb") as file:
                with tarfile.open(fileobj=file, mode="w") as tar:
                    tar.add(model, arcname=name)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, archive)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return archive
