"""The job-spec settings that are not stages: adapter, quantization, DeepSpeed, resources and a stage's data.

Every spec model derives from :class:`SpecModel`, which refuses unknown fields and turns each field's
docstring into its description (the API schema and ``docs/spec.md`` show it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SpecModel(BaseModel):
    """Base of every spec model: unknown fields refused, field docstrings as descriptions, values frozen."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)


MAX_STEPS = 10_000_000
"""Upper bound of every step count and step interval in a spec."""
MAX_TOKENS = 1 << 20
"""Upper bound of every token length in a spec."""


PEFT_ADAPTERS = ("lora", "dora", "ia3", "prefix", "prompt")
"""Adapter types that train a peft adapter beside frozen base weights; the artifact is the adapter."""
PROMPT_LEARNING_ADAPTERS = ("prefix", "prompt")
"""Adapter types that add virtual tokens in front of every sequence instead of changing weights (peft's prompt
learning): the keys and values of prefix tuning, the input embeddings of prompt tuning."""
WHOLE_MODEL_ADAPTERS = ("full", "bias")
"""Adapter types whose artifact is the whole model (no peft wrapper): every weight trains, or only the biases."""


class AdapterSpec(SpecModel):
    type: Literal["lora", "dora", "ia3", "prefix", "prompt", "bias", "full"] = "lora"
    """`lora` (low-rank adapter), `dora` (weight-decomposed LoRA), `ia3` (IA3, Liu et al. 2022: learned vectors
    that rescale the keys, the values and the feed-forward activations), `prefix` (prefix tuning, Li and Liang
    2021: `num_virtual_tokens` learned keys and values in front of every sequence, in every layer), `prompt`
    (prompt tuning, Lester et al. 2021: `num_virtual_tokens` learned input embeddings in front of every
    sequence), `bias` (BitFit, Ben Zaken et al. 2022: only the model's bias parameters train; the artifact is the
    whole model, loadable with plain transformers; a model without biases, as Llama-style models usually are, is
    refused when the stage starts) or `full` (every weight trains). `prefix` and `prompt` train the offline policy
    stages (sft and the preference stages) on padded batches: their virtual tokens have no place in packed rows,
    so such a stage pads whatever its `padding_free` says, and says so. Online stages (ppo, grpo, rloo) and rm
    stages are refused with them, and their artifact cannot be exported merged (`align export` without
    `--merge` gives the adapter)."""
    r: int = Field(16, ge=1, le=1024)
    """LoRA rank (`lora` and `dora`; ignored by the other types)."""
    alpha: float = Field(32.0, gt=0, le=1e6)
    """LoRA scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input (`lora` and `dora`). DPO stages switch dropout off so the policy and reference
    agree at step 0."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the output head) or a list of names.
    For `ia3`, `all-linear` means the IA3 paper's targets as peft maps them per architecture (Llama and Mistral:
    `k_proj`, `v_proj`, `down_proj`; Qwen2 and Qwen3: `q_proj`, `v_proj`, `down_proj`); in a list, the modules
    peft counts as feed-forward for the architecture (`down_proj` for these) have their input rescaled, every
    other module its output. Ignored by `bias` and `full`."""
    lora_plus_ratio: float | None = Field(None, gt=0, le=1e6)
    """LoRA+ (Hayou et al. 2024): the B matrices learn this many times faster than the A matrices. Off if unset."""
    rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of alpha / r, so
    that higher ranks keep learning. `lora` and `dora` only."""
    init: Literal["default", "pissa", "olora"] = "default"
    """How a new LoRA adapter starts (`lora` only). `default`: A random, B zero, so the adapter starts as a
    no-op. `pissa` (Meng et al. 2024): A and B from the principal singular vectors of each targeted weight,
    the base keeping the residual (peft's fast SVD, `pissa_niter_4`: four subspace iterations); `olora`
    (Büyükakyüz 2024): A and B from a QR decomposition of each weight. Both change the base weights while
    training; the saved adapter is converted to a plain LoRA adapter of rank 2r on the untouched base model
    (peft's conversion), so it loads like any other. Only the first adapter of a job is initialised this
    way (a stage continuing an adapter loads it); reward-model and critic adapters start as `default`.
    Not with `quantization`."""
    num_virtual_tokens: int = Field(20, ge=1, le=MAX_TOKENS)
    """Virtual tokens of `prefix` and `prompt` (ignored by the other types). Each sequence the model sees is this
    much longer: a stage's `max_length` counts the real tokens only."""
    prompt_init_text: str | None = Field(None, min_length=1, max_length=100_000)
    """Text whose token embeddings start the virtual tokens of `prompt` (peft's `TEXT` initialisation: its
    tokens repeated or cut to `num_virtual_tokens`), e.g. a description of the task. Unset: random embeddings
    (peft's `RANDOM`). `prompt` only."""

    @property
    def is_peft(self) -> bool:
        """Whether the policy is a peft adapter on frozen base weights (else the artifact is the whole model)."""
        return self.type in PEFT_ADAPTERS

    @property
    def is_prompt_learning(self) -> bool:
        """Whether the adapter adds virtual tokens (prefix or prompt tuning) rather than changing weights."""
        return self.type in PROMPT_LEARNING_ADAPTERS

    def stage_problem(self, stage_type: str, where: str) -> str | None:
        """Why this adapter cannot train the stage ``where`` (e.g. ``stages[2]``) of ``stage_type``: a message
        that starts with the field to change; None when it can."""
        if not self.is_prompt_learning:
            return None
        if stage_type in ("ppo", "grpo", "rloo"):
            return (f"adapter.type: '{self.type}' cannot train {where}, a {stage_type} stage: online stages "
                    "sample completions and score them through their own KV cache over left-padded prompts with "
                    "explicit positions, which peft's prefix tuning replaces (the cache) and prompt tuning ignores "
                    "(the positions); use adapter.type 'lora', 'dora' or 'ia3' for a job with ppo, grpo or rloo "
                    "stages")
        if stage_type == "rm":
            return (f"adapter.type: '{self.type}' cannot train {where}, an rm stage: wherever a reward model "
                    "scores (PPO's critic, the rewards of online stages, held-out reward evaluation) it is read "
                    "through its body alone, and a policy adapter it starts from is merged into its weights; "
                    "virtual tokens are neither; use adapter.type 'lora', 'dora' or 'ia3' for a job with an rm "
                    "stage")
        return None

    @model_validator(mode="after")
    def _type_rules(self) -> AdapterSpec:
        if self.rslora and self.type not in ("lora", "dora"):
            raise ValueError(f"adapter.rslora: rank-stabilised scaling is for adapter.type 'lora' or 'dora', not "
                             f"'{self.type}'; set rslora false")
        if self.init != "default" and self.type != "lora":
            raise ValueError(f"adapter.init: '{self.init}' initialises LoRA matrices; it needs adapter.type 'lora' "
                             f"(got '{self.type}'); set init: default")
        if self.lora_plus_ratio is not None and self.type in ("ia3", "bias", *PROMPT_LEARNING_ADAPTERS):
            raise ValueError(f"adapter.lora_plus_ratio: LoRA+ speeds up LoRA's B matrices and adapter.type "
                             f"'{self.type}' has none; remove lora_plus_ratio")
        if self.prompt_init_text is not None and self.type != "prompt":
            raise ValueError(f"adapter.prompt_init_text: starts the virtual tokens of adapter.type 'prompt', not "
                             f"'{self.type}'; remove prompt_init_text")
        return self


class QuantizationSpec(SpecModel):
    bits: Literal[4, 8] = 4
    """Base-weight precision through bitsandbytes: 4 (QLoRA) or 8."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, the QLoRA default) or `fp4`."""
    double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA's double quantisation)."""


class DeepSpeedSpec(SpecModel):
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state and step on the CPU (ZeRO 1-3). Uses DeepSpeed's compiled CPU Adam."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision. `auto` trains in bf16 where the hardware computes in bf16 natively (CUDA devices
    that support it, CPUs with AVX512-BF16 or AMX) and in fp32 elsewhere; each stage logs what it chose and
    why, and its manifest records it. An explicit `bf16` on hardware that emulates it runs many times
    slower (a warning gives the measured factor). bf16 keeps fp32 master weights in the optimizer."""
    gradient_clipping: float = Field(1.0, ge=0.0, le=1e6)
    """Clip the global gradient norm to this value; 0 switches clipping off."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""


class ResourcesSpec(SpecModel):
    num_workers: int = Field(1, ge=1, le=1024)
    """Data-parallel training processes (ranks)."""
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    """CPU cores per rank; also sets the rank's torch thread count."""
    gpus_per_worker: float = Field(0.0, ge=0, le=64)
    """GPUs per rank (0 trains on CPU)."""


class DataSpec(SpecModel):
    path: str
    """Training data: a local JSONL/JSON/Parquet/CSV file, a `datasets.save_to_disk` folder, or `builtin:<name>`."""
    eval_path: str | None = None
    """Held-out data in the same format. Takes precedence over `eval_fraction`."""
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5)
    """Fraction of the training rows held out for evaluation when `eval_path` is not set."""
    max_rows: int | None = Field(None, ge=1, le=10**12)
    """Use at most this many training rows (after shuffling with the stage seed)."""
