"""Adapters on the base model (LoRA, DoRA, QLoRA, IA3, prefix and prompt tuning), bias-only training (BitFit),
saving them, and LoRA+ parameter groups.

PiSSA and OLoRA start the LoRA matrices from a decomposition of each targeted weight and leave the base
holding the rest (``W = W_res + s·B0·A0``). The starting matrices are kept (:data:`INITIAL_LORA`): the
reference policy of a fresh adapter is the base plus them (:func:`add_initial_lora_copy`), and the saved
adapter is the plain LoRA adapter of the update on the untouched base (:func:`lora_from_mutated_init`).

Prefix and prompt tuning (peft's prompt learning) change no weight: their virtual tokens go in front of every
sequence, as keys and values in every layer (prefix) or as input embeddings (prompt). A prompt-tuned model's
forward is made to return logits for the given tokens only (:func:`score_given_tokens_only`).
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.utils import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    PeftType,
    load_peft_weights,
    set_peft_model_state_dict,
)

from align.models.load import ModelError
from align.spec import AdapterSpec

LORA_INITS = {"default": True, "pissa": "pissa_niter_4", "olora": "olora"}
"""``adapter.init`` as peft's ``init_lora_weights``. PiSSA through peft's fast randomised SVD with four
subspace iterations (seeded by the stage seed, so a resumed stage rebuilds the same residual base)."""
INITIAL_LORA = "align_initial_lora"
"""Attribute of a PeftModel whose adapter started from a decomposition of the base (PiSSA, OLoRA): CPU
copies of the adapter's starting ``lora_A``/``lora_B`` weights, by parameter name."""


def apply_adapter(
    model: torch.nn.Module,
    spec: AdapterSpec,
    *,
    task_type: str,
    quantized: bool,
    init_from: Path | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """Make ``model`` trainable as ``spec`` asks.

    ``init_from`` is an earlier stage's adapter folder: training continues from those weights. With
    ``full`` fine-tuning or ``bias`` the earlier stage's weights are the model itself, so nothing is added.
    ``adapter.init`` applies to a new policy adapter (``task_type`` ``CAUSAL_LM``) only; a reward model's
    or critic's starts as peft's default. A prompt-tuned model comes back with a forward whose logits are
    those of the given tokens (:func:`score_given_tokens_only`).
    """
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.type == "full":
        model.requires_grad_(True)
        return model
    if spec.type == "bias":
        train_biases_only(model, task_type)
        return model
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if init_from is not None:
        return score_given_tokens_only(continue_adapter(model, init_from))
    config = peft_config(spec, model, task_type)
    if gradient_checkpointing or quantized:
        model.enable_input_require_grads()
    model = get_peft_model(model, config)
    if isinstance(config, LoraConfig) and config.init_lora_weights is not True:
        setattr(model, INITIAL_LORA, {
            name: param.detach().to("cpu", copy=True)
            for name, param in model.named_parameters() if ".default." in name and "lora_" in name
        })
    return score_given_tokens_only(model)


def continue_adapter(model: torch.nn.Module, folder: Path) -> PeftModel:
    """``model`` with the saved adapter in ``folder`` on it, trainable.

    peft loads a prefix- or prompt-tuning adapter for inference only (``PeftModel.from_pretrained`` refuses
    ``is_trainable``): such an adapter is made anew from its saved config and its virtual tokens loaded into
    it. One initialised from text is built from its text first (then overwritten), with the tokenizer of
    this machine's base folder (``model``'s), not the base the artifact names (``builtin:tiny``, another
    machine's folder).
    """
    config = PeftConfig.from_pretrained(folder)
    if not config.is_prompt_learning:
        return PeftModel.from_pretrained(model, folder, is_trainable=True)
    if getattr(config, "prefix_projection", False):
        raise ModelError(f"the prefix-tuning adapter in {folder} was trained with a prefix projection, which peft "
                         "saves projected and cannot train further; start a new adapter from the base model")
    config.inference_mode = False
    if getattr(config, "prompt_tuning_init", None) == "TEXT":
        config.tokenizer_name_or_path = str(model.name_or_path)
    continued = get_peft_model(model, config)
    set_peft_model_state_dict(continued, load_peft_weights(str(folder)))
    return continued


def score_given_tokens_only(model: torch.nn.Module) -> torch.nn.Module:
    """A prompt-tuned ``model`` whose forward returns the logits of the tokens it is given, (batch, seq, vocab);
    any other model as it is.

    Prompt tuning puts its virtual tokens in front of the input embeddings, so peft's forward returns logits
    for them too, (batch, virtual + seq, vocab); the stages read logits aligned with ``input_ids``. (Prefix
    tuning's virtual tokens are keys and values only: its logits are aligned already.) peft's
    ``disable_adapter`` swaps in the base model's forward and back, so the reference passes of a fresh adapter
    are aligned too.
    """
    if not isinstance(model, PeftModel) or model.peft_config["default"].peft_type != PeftType.PROMPT_TUNING:
        return model
    prompt_tuned_forward = model.forward

    def forward(*args, **kwargs):
        output = prompt_tuned_forward(*args, **kwargs)
        output.logits = output.logits[:, model.active_peft_config.num_virtual_tokens :]
        return output

    model.forward = forward
    return model


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a peft model, a DeepSpeed engine around one, or any model) runs a prefix- or
    prompt-tuning adapter: virtual tokens in front of every sequence."""
    if not isinstance(model, PeftModel):
        model = getattr(model, "module", None)
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def peft_config(spec: AdapterSpec, model: torch.nn.Module, task_type: str) -> PeftConfig:
    """The peft config of a new ``spec`` adapter on ``model``. A prompt-tuning adapter initialised from text reads
    the tokenizer in the folder ``model`` was loaded from."""
    if spec.type == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
    if spec.type == "prompt":
        if spec.prompt_init_text is None:
            return PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=task_type)
        return PromptTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=spec.prompt_init_text,
                                  tokenizer_name_or_path=str(model.name_or_path), task_type=task_type)
    if spec.type == "ia3":
        targets, feedforward = ia3_modules(spec.target_modules, getattr(model.config, "model_type", None))
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type=task_type)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.type == "dora",
        use_rslora=spec.rslora,
        init_lora_weights=LORA_INITS[spec.init] if task_type == "CAUSAL_LM" else True,
        task_type=task_type,
    )


def ia3_modules(target_modules: str | list[str], model_type: str | None) -> tuple[list[str], list[str]]:
    """IA3's targets and, among them, the feed-forward modules (whose input is rescaled, not their output).

    ``all-linear`` is the IA3 paper's choice as peft maps it per architecture (Llama: keys, values and the
    MLP's down projection, the latter feed-forward); in a list, the modules peft names feed-forward for the
    architecture are, and every other module rescales its output.
    """
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    if target_modules == "all-linear":
        if model_type not in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            raise ModelError(f"adapter.target_modules: 'all-linear' with adapter.type 'ia3' means peft's IA3 "
                             f"targets for the architecture and peft has none for '{model_type}'; list the "
                             "modules to rescale, e.g. [k_proj, v_proj, down_proj]")
        return list(TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]), list(feedforward)
    return list(target_modules), [name for name in target_modules if name in feedforward]


def train_biases_only(model: torch.nn.Module, task_type: str) -> None:
    """BitFit (Ben Zaken et al. 2022): freeze every weight but the biases; a reward model's new scalar head
    (``score``) trains too. Raises :class:`ModelError` for a model without biases."""
    model.requires_grad_(False)
    biases = [param for name, param in model.named_parameters() if name.endswith(".bias")]
    if not biases:
        name = getattr(model, "name_or_path", "") or "(unnamed)"
        raise ModelError(f"adapter.type: 'bias' trains only the bias parameters and the model {name} has none "
                         "(Llama-style models usually have none); use adapter.type 'lora', 'ia3' or 'full'")
    for param in biases:
        param.requires_grad_(True)
    if task_type == "SEQ_CLS" and getattr(model, "score", None) is not None:
        model.score.requires_grad_(True)


def add_initial_lora_copy(model: PeftModel, adapter_name: str) -> bool:
    """Add a frozen adapter ``adapter_name`` holding the starting matrices of a PiSSA or OLoRA adapter: on the
    residual base it computes the original base model. False (nothing added) for any other model."""
    initial = getattr(model, INITIAL_LORA, None)
    if initial is None:
        return False
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True  # the residual base must not be decomposed again
    config.inference_mode = True
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter_name}." in name:
                param.copy_(initial[name.replace(f".{adapter_name}.", ".default.")])
                param.requires_grad_(False)
    return True


def lora_from_mutated_init(trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict:
    """A PiSSA/OLoRA adapter as a plain LoRA adapter on the original base (peft's ``subtract_mutated_init``).

    With ``W = W_res + s·B0·A0`` at the start and ``W_res + s·B·A`` after training, the update on ``W`` is
    ``ΔW = s·(B·A - B0·A0) = s·[B | -B0]·[A ; A0]``: a LoRA adapter of rank ``2r`` with ``A' = [A ; A0]``
    (rows stacked), ``B' = [B | -B0]`` (columns side by side) and the same scale ``s`` (alpha doubled, or
    times sqrt(2) under rslora: :func:`converted_lora_config`). Other entries pass through unchanged.
    """
    converted = {}
    for name, tensor in trained.items():
        if "lora_A" in name:
            converted[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif "lora_B" in name:
            converted[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
        else:
            converted[name] = tensor
    return converted


def converted_lora_config(config: dict) -> dict:
    """``adapter_config.json`` of :func:`lora_from_mutated_init`'s adapter: rank doubled, scale kept, and a
    default init so that loading it leaves the base untouched (what peft's own conversion writes)."""
    converted = dict(config, r=2 * config["r"], init_lora_weights=True)
    converted["lora_alpha"] = config["lora_alpha"] * (math.sqrt(2) if config.get("use_rslora") else 2)
    return converted


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float, lora_plus_ratio: float | None):
    """Optimizer groups. With LoRA+ (Hayou et al. 2024) the B matrices get ``lr * lora_plus_ratio``."""
    regular, lora_b = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (lora_b if lora_plus_ratio and "lora_B" in name else regular).append(param)
    groups = [{"params": regular, "lr": lr, "weight_decay": weight_decay}]
    if lora_b:
        groups.append({"params": lora_b, "lr": lr * lora_plus_ratio, "weight_decay": weight_decay})
    return groups


def trainable_state_dict(model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, gathered from every rank under ZeRO-3."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gather = nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        return {name: param.detach().to("cpu", copy=True) for name, param in named}


def save_trainable(
    model: torch.nn.Module, out_dir: Path, zero_stage: int, write: bool, base_model: str | None = None
) -> None:
    """Save what the stage trained: the peft adapter (a PiSSA or OLoRA adapter converted to plain LoRA on the
    untouched base), or the whole model after full fine-tuning or bias training.

    Every rank must call this (ZeRO-3 gathers collectively); only ranks with ``write`` write files.
    ``base_model`` is how ``adapter_config.json`` names the base (``base_model_name_or_path``), e.g.
    ``builtin:tiny``, in place of the local folder peft records: the folder the base was loaded from,
    which for ``builtin:tiny`` is a cache folder. It is written after peft saved, since peft reads the
    base's config.json from that folder while saving. A prompt-tuning adapter initialised from text names the
    same base for its tokenizer (``tokenizer_name_or_path``).
    """
    if isinstance(model, PeftModel):
        state = trainable_state_dict(model, zero_stage)
        initial = getattr(model, INITIAL_LORA, None)
        if initial is not None:
            state = lora_from_mutated_init(state, initial)
        gather = nullcontext()
        if is_prompt_learning(model) and zero_stage == 3:
            # peft saves virtual tokens from the prompt encoder itself, not from ``state``.
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(model.prompt_encoder["default"].parameters()),
                                                       modifier_rank=None)
        with gather:
            if write:
                model.save_pretrained(out_dir, state_dict=state, selected_adapters=["default"])
        if write:
            config_file = Path(out_dir) / "adapter_config.json"
            config = json.loads(config_file.read_text())
            if initial is not None:
                config = converted_lora_config(config)
            if base_model is not None:
                config["base_model_name_or_path"] = base_model
                if config.get("tokenizer_name_or_path"):
                    config["tokenizer_name_or_path"] = base_model
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        return
    named = list(model.named_parameters())
    gather = nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        if write:
            state = {n: p.detach().to("cpu", copy=True) for n, p in model.state_dict().items()}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
