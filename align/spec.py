"""The job spec: one schema for the CLI, the API, the workers and the docs.

A job trains one base model through a chain of stages. Each stage starts from the policy the stage
before it left (an SFT or DPO adapter); a reward-model stage leaves a reward model beside the chain.
Unknown fields are refused, every field carries its own documentation, and the rules that tie
fields together are checked here so a bad job fails before it reaches a worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGE_TYPES = ("sft", "rm", "dpo", "ppo", "grpo", "rloo")
POLICY_STAGE_TYPES = ("sft", "dpo", "ppo", "grpo", "rloo")
"""Stages that leave a policy: the next stage starts from the latest of them."""
ONLINE_STAGE_TYPES = ("ppo", "grpo", "rloo")
"""Stages that sample from the policy while they train."""
RewardName = Literal["exact_answer"]
"""Reward functions a stage may name; ``align.rewards.REWARDS`` maps each to its function."""
MODEL_REWARD = "model"
"""The ``reward`` of an online stage that scores with a reward model."""
PRECISION_SUMMARY_PREFIX = "precision "
"""How a stage's first message begins: the precision it trains in and why (``align.precision``)."""
RewardChoice = Literal["model", "exact_answer"]
"""What an online stage's ``reward`` may name: the reward model or a reward function."""
if get_args(RewardChoice) != (MODEL_REWARD, *get_args(RewardName)):
    raise RuntimeError("RewardChoice must be 'model' followed by the RewardName functions")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class AdapterSpec(_Spec):
    type: Literal["lora", "dora", "full"] = "lora"
    """`lora` (low-rank adapter), `dora` (weight-decomposed LoRA) or `full` (every weight trains)."""
    r: int = Field(16, ge=1, le=1024)
    """LoRA rank."""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input. DPO stages switch dropout off so the policy and reference agree at step 0."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Modules that get an adapter: `all-linear` (every linear layer but the output head) or a list of names."""
    lora_plus_ratio: float | None = Field(None, gt=0)
    """LoRA+ (Hayou et al. 2024): the B matrices learn this many times faster than the A matrices. Off if unset."""


class QuantizationSpec(_Spec):
    bits: Literal[4, 8] = 4
    """Base-weight precision through bitsandbytes: 4 (QLoRA) or 8."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: `nf4` (NormalFloat, the QLoRA default) or `fp4`."""
    double_quant: bool = True
    """Quantise the quantisation constants too (QLoRA's double quantisation)."""


class DeepSpeedSpec(_Spec):
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state and step on the CPU (ZeRO 1-3). Uses DeepSpeed's compiled CPU Adam."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision. `auto` trains in bf16 where the hardware computes in bf16 natively (CUDA devices
    that support it, CPUs with AVX512-BF16 or AMX) and in fp32 elsewhere; each stage logs what it chose and
    why, and its manifest records it. An explicit `bf16` on hardware that emulates it runs many times
    slower (a warning gives the measured factor). bf16 keeps fp32 master weights in the optimizer."""
    gradient_clipping: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this value; 0 switches clipping off."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""


class ResourcesSpec(_Spec):
    num_workers: int = Field(1, ge=1, le=1024)
    """Data-parallel training processes (ranks)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPU cores per rank; also sets the rank's torch thread count."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs per rank (0 trains on CPU)."""


class DataSpec(_Spec):
    path: str
    """Training data: a local JSONL/JSON/Parquet/CSV file, a `datasets.save_to_disk` folder, or `builtin:<name>`."""
    eval_path: str | None = None
    """Held-out data in the same format. Takes precedence over `eval_fraction`."""
    eval_fraction: float = Field(0.0, ge=0.0, le=0.5)
    """Fraction of the training rows held out for evaluation when `eval_path` is not set."""
    max_rows: int | None = Field(None, ge=1)
    """Use at most this many training rows (after shuffling with the stage seed)."""


class _StageBase(_Spec):
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    """Stage name, unique in the job (default `<type>` or `<type>-<index>` when a type repeats)."""
    data: DataSpec
    """Where the stage's rows come from."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training rows. Ignored when `max_steps` is set."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train for; overrides `epochs`."""
    lr: float = Field(2e-4, gt=0, le=1.0)
    """Peak learning rate."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up: cosine or linear to zero, or constant."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of the steps spent warming the learning rate up linearly from zero."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW decoupled weight decay."""
    batch_size: int = Field(8, ge=1)
    """Rows per micro-batch on each worker (pairs for rm and dpo)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step. Global batch = batch_size x gradient_accumulation_steps x num_workers."""
    max_length: int = Field(512, ge=8)
    """Longest tokenised sequence (prompt plus response)."""
    truncation: Literal["right", "left", "drop"] = "right"
    """Over-long rows: `right` cuts the end, `left` cuts the start of the prompt, `drop` skips the row."""
    eval_every: int | None = Field(None, ge=1)
    """Evaluate on the held-out rows every this many steps (always once at the end)."""
    eval_exact_match: bool = False
    """Also generate greedy answers for held-out prompts and report exact-match accuracy against the reference."""
    checkpoint_every: int | None = Field(50, ge=1)
    """Save a resumable checkpoint every this many steps (unset: only at the end)."""
    log_every: int = Field(1, ge=1)
    """Write step metrics every this many steps."""
    seed: int = 42
    """Seeds data order, adapter initialisation and dropout."""


class SFTStage(_StageBase):
    """Supervised fine-tuning on demonstrations; loss only on assistant tokens."""

    type: Literal["sft"]
    """`sft`."""


class RewardModelStage(_StageBase):
    """Bradley-Terry reward model: a scalar head on the policy, trained on preference pairs."""

    type: Literal["rm"]
    """`rm`."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Longest prompt; longer prompts lose their start."""
    init: Literal["policy", "base"] = "policy"
    """Start from the current policy (the SFT model, as in InstructGPT) or from the base model."""
    lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate."""


class DPOStage(_StageBase):
    """Direct Preference Optimization against the frozen starting policy."""

    type: Literal["dpo"]
    """`dpo`."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty to the reference."""
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """`sigmoid` (DPO; with label smoothing: conservative DPO), `ipo`, `hinge` (SLiC) or `robust` (rDPO)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """Assumed fraction of flipped labels, for `sigmoid` (cDPO) and `robust`."""
    sft_weight: float = Field(0.0, ge=0.0)
    """Weight of an added length-normalised NLL on the chosen responses (RPO)."""
    reference: Literal["live", "precomputed"] = "live"
    """Reference log-probs computed beside each step (`live`) or once before training (`precomputed`)."""
    max_prompt_length: int | None = Field(None, ge=1)
    """Longest prompt; longer prompts lose their start."""
    lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate."""

    @model_validator(mode="after")
    def _smoothing_fits_loss(self) -> DPOStage:
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing: {self.label_smoothing} only applies to loss 'sigmoid' or 'robust', "
                f"not '{self.loss}': set label_smoothing to 0 or change the loss"
            )
        return self


class _OnlineStage(_StageBase):
    """What every online RL stage shares: prompts, sampling and the reward."""

    data: DataSpec
    """Prompts to train on (a `prompt` column, or any format a prompt can be taken from); `eval_path`
    rows with a reference answer (`prompt`/`completion`) also give held-out greedy accuracy."""
    reward_model: str | None = Field(None, pattern=r"^artifact:[A-Za-z0-9][A-Za-z0-9._-]*$")
    """With `reward: model`, the reward model to score with, as `artifact:<id>` of an `rm` stage's
    artifact. Unset: the artifact of the latest `rm` stage before this one in the job."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens sampled per completion (EOS included). Prompts are cut from the left to
    `max_length - max_new_tokens` tokens."""
    temperature: float = Field(1.0, gt=0, le=4.0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1.0)
    """Nucleus sampling mass; 1 samples from the whole distribution."""
    clip_eps: float = Field(0.2, gt=0, lt=1.0)
    """PPO ratio clip range: the ratio to the sampling policy is clipped to [1 - clip_eps, 1 + clip_eps]."""
    batch_size: int = Field(8, ge=1)
    """Prompts per micro-batch on each worker."""
    lr: float = Field(1e-5, gt=0, le=1.0)
    """Peak learning rate."""

    @model_validator(mode="after")
    def _room_for_completions(self):
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens: {self.max_new_tokens} must be below max_length ({self.max_length}), "
                "which holds the prompt and the completion"
            )
        if self.reward_model is not None and self.reward != MODEL_REWARD:
            raise ValueError(
                f"reward_model: only used with reward '{MODEL_REWARD}', not '{self.reward}'; "
                f"set reward: {MODEL_REWARD} or drop reward_model"
            )
        return self


class GRPOStage(_OnlineStage):
    """Critic-free online RL: sample a group of completions per prompt, score them, and push the
    policy towards the better ones (GRPO, Shao et al. 2024; `type: rloo` uses the leave-one-out
    baseline of Ahmadian et al. 2024 instead). The KL to the frozen starting policy is a loss term."""

    type: Literal["grpo", "rloo"]
    """`grpo` (advantage: reward minus the group mean, over the group standard deviation) or `rloo`
    (advantage: reward minus the mean of the other samples of the group)."""
    reward: RewardChoice
    """`model` scores with a reward model (see `reward_model`); or a reward function by name from a
    fixed list: `exact_answer` (1 when the completion is exactly the right answer of the built-in
    parity task, else 0)."""
    group_size: int = Field(8, ge=2, le=256)
    """Completions sampled per prompt; the group is each sample's baseline."""
    kl_coef: float = Field(0.04, ge=0)
    """Weight of the KL to the starting policy (see `kl_penalty`); 0 drops it."""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """Where the KL goes: `loss` adds `kl_coef` times the per-token k3 estimate to the loss (GRPO);
    `reward` subtracts `kl_coef` times the completion's summed k1 estimate from its reward before the
    group advantages are taken (the RLOO paper's form)."""
    batch_size: int = Field(8, ge=1)
    """Prompts per micro-batch on each worker (each brings `group_size` completions)."""
    eval_exact_match: bool = True
    """Generate greedy answers for the held-out prompts and report exact-match accuracy, before
    training and at every evaluation."""


class PPOStage(_OnlineStage):
    """PPO with a learned critic against a reward model, as in InstructGPT (Ouyang et al. 2022): each
    step samples one completion per prompt, scores it, puts a per-token KL penalty to the frozen
    starting policy into the reward, estimates advantages with GAE and takes `ppo_epochs` clipped
    policy and value updates on the batch."""

    type: Literal["ppo"]
    """`ppo`."""
    reward: RewardChoice = "model"
    """`model` scores with a reward model (see `reward_model`); or a reward function by name from a
    fixed list: `exact_answer` (1 when the completion is exactly the right answer of the built-in
    parity task, else 0)."""
    critic_init: Literal["reward_model", "policy"] = "reward_model"
    """Where the critic (value model) starts: the reward model with its head as the value head
    (InstructGPT), or the starting policy with a zero value head. `reward_model` shares the frozen
    reward model's weights and needs `reward: model`."""
    critic_lr: float = Field(5e-5, gt=0, le=1.0)
    """Peak learning rate of the critic."""
    ppo_epochs: int = Field(4, ge=1, le=64)
    """Optimisation passes over each batch of samples; each pass is one optimizer step of the
    policy and one of the critic."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight β of the per-token KL penalty to the starting policy in the reward (its start value
    when `kl_target` is set)."""
    kl_target: float | None = Field(None, gt=0)
    """Adapt β towards this KL per completion (nats, summed over its tokens), by at most ±20% per
    `kl_horizon` samples (Ziegler et al. 2019). Unset: β stays `kl_coef`."""
    kl_horizon: int = Field(10000, ge=1)
    """Samples over which the adaptive β may change by the full ±20%."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate in the reward: `k1` (log-ratio, unbiased, can be negative) or `k3`
    (always ≥ 0, lower variance)."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE discount."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ: 1 gives Monte-Carlo returns, 0 one-step TD."""
    value_clip_eps: float = Field(0.2, gt=0)
    """The value estimate may move at most this far from its sampling-time value before the
    clipped value loss stops pulling it."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of an entropy bonus in the policy loss; 0 switches it off."""
    whiten_advantages: bool = True
    """Normalise the batch's advantages to mean 0 and variance 1 (over all workers)."""
    missing_eos_penalty: float | None = Field(None, ge=0.0)
    """Subtract this from the score of completions cut at `max_new_tokens` before they ended."""
    eval_samples: int = Field(1, ge=1, le=64)
    """Completions sampled per held-out prompt when evaluating the mean reward."""


StageSpec = Annotated[Union[SFTStage, RewardModelStage, DPOStage, PPOStage, GRPOStage], Field(discriminator="type")]


class JobSpec(_Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")
    """Job name: lower-case letters, digits, `.`, `_`, `-`. Names the artifact lineages."""
    base_model: str
    """`builtin:tiny` or a local Hugging Face model folder (safetensors). `artifact:<id>` is reserved for a later release."""
    adapter: AdapterSpec = AdapterSpec()
    """How the policy trains: LoRA, DoRA or full fine-tuning."""
    quantization: QuantizationSpec | None = None
    """Quantise the frozen base weights (QLoRA). Unset: no quantisation."""
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    """DeepSpeed engine settings shared by every stage."""
    resources: ResourcesSpec = ResourcesSpec()
    """Workers per stage and what each one gets."""
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
        if q is not None and adapter.type == "full":
            raise ValueError(
                "quantization: not possible with adapter.type='full'"
                ": quantised base weights are frozen; "
                "use adapter.type 'lora' or 'dora', or drop quantization"
            )
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3; raise zero_stage or set it false")
        names = self.stage_names()
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise ValueError(f"stages[{i}].name: '{name}' is used twice; give each stage its own name")
        for i, stage in enumerate(self.stages):
            if stage.type in ONLINE_STAGE_TYPES:
                self._check_online_stage(i, stage)
            if stage.type in ONLINE_STAGE_TYPES and adapter.type == "full":
                raise ValueError(
                    f"stages[{i}].type: '{stage.type}' needs adapter.type 'lora' or 'dora': its reference "
                    "is the starting adapter kept frozen beside the trained one"
                )
            prompt_limit = getattr(stage, "max_prompt_length", None)
            if prompt_limit is not None and prompt_limit >= stage.max_length:
                raise ValueError(
                    f"stages[{i}].max_prompt_length: {prompt_limit} must be below max_length ({stage.max_length})"
                )
        return self

    def _check_online_stage(self, i: int, stage: Any) -> None:
        earlier_rm = any(s.type == "rm" for s in self.stages[:i])
        if stage.reward == MODEL_REWARD and stage.reward_model is None and not earlier_rm:
            raise ValueError(
                f"stages[{i}].reward_model: reward '{MODEL_REWARD}' needs a reward model; add an rm stage "
                "before this one or set reward_model: artifact:<id>"
            )
        if getattr(stage, "critic_init", None) == "reward_model" and stage.reward != MODEL_REWARD:
            raise ValueError(
                f"stages[{i}].critic_init: 'reward_model' needs reward '{MODEL_REWARD}'; "
                f"set critic_init: policy to train a critic with the '{stage.reward}' reward"
            )

    def stage_names(self) -> list[str]:
        """Each stage's name: its own, else its type, numbered when the type repeats."""
        counts = {t: sum(s.type == t for s in self.stages) for t in STAGE_TYPES}
        return [s.name or (s.type if counts[s.type] == 1 else f"{s.type}-{i}") for i, s in enumerate(self.stages)]

    def hash(self) -> str:
        """Content hash of the spec (canonical JSON)."""
        import hashlib

        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
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
    if error["type"] != "value_error" and "input" in error and not isinstance(error["input"], (dict, list)):
        return f"{msg} (got {error['input']!r})"
    return msg


def parse_spec(data: Any, source: str | None = None) -> JobSpec:
    """Validate a parsed spec, turning pydantic's errors into a :class:`SpecError` that names each field."""
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        errors = []
        for e in exc.errors():
            msg = _message(e)
            where = _field_path(e["loc"])
            # Rules across fields name their field at the start of the message.
            m = re.match(r"^((?:stages\[\d+\]\.)?[a-z_]+(?:\.[a-z_]+)?): (.*)$", msg, re.S)
            if m:
                prefix = where if where.startswith("stages[") and not m.group(1).startswith("stages[") else ""
                errors.append(((prefix + "." if prefix else "") + m.group(1), m.group(2)))
            else:
                errors.append((where, msg))
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
        raise SpecError([("(file)", f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")], str(path))
    if not isinstance(data, dict):
        raise SpecError([("(spec)", "expected a mapping of fields at the top level")], str(path))
    return parse_spec(data, str(path))
