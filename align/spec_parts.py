"""The job-spec settings that are not stages: adapter, quantization, DeepSpeed, resources and a stage's data.

Every spec model derives from :class:`SpecModel`, which refuses unknown fields and turns each field's
docstring into its description (the API schema and ``docs/spec.md`` show it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SpecModel(BaseModel):
    """Base of every spec model: unknown fields refused, field docstrings as descriptions, values frozen."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)


MAX_STEPS = 10_000_000
"""Upper bound of every step count and step interval in a spec."""
MAX_TOKENS = 1 << 20
"""Upper bound of every token length in a spec."""


class AdapterSpec(SpecModel):
    type: Literal["lora", "dora", "full"] = "lora"
    """`lora` (low-rank adapter), `dora` (weight-decomposed LoRA) or `full` (every weight trains)."""
    r: int = Field(16, ge=1, le=1024)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0, le=1e6)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. DPO stages switch dropout off so the policy and reference agree at step 0."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the output head) or a list of names."""
    lora_plus_ratio: float | None = Field(None, gt=0, le=1e6)
    """LoRA+ (Hayou et al. 2024): the B matrices learn this many times faster than the A matrices. Off if unset."""


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
