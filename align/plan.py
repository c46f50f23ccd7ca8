"""The planner: each stage's peak memory per rank and its step time, estimated before a job runs.

:func:`plan_job` takes a parsed job spec and the base model's transformers config and returns one
:class:`StagePlan` per stage. It reads no file and probes no hardware: the device it plans for is a
:class:`Device` from the table here (:data:`GPUS`) or :func:`cpu_device`, which the CLI fills with
this machine's RAM. The accounting itself is in :mod:`align.plan_memory`; ``align plan`` prints the
plans (:mod:`align.plan_report`).

Lengths are worst cases: every sequence is ``max_length`` tokens long, every prompt of an online
stage ``max_length - max_new_tokens`` and every completion ``max_new_tokens``. Packed stages
(``padding_free``) then hold the same tokens as padded ones; they differ in the logits, which a packed
micro-batch projects to the vocabulary for its scored positions only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from align.plan_memory import (
    GiB,
    ModelShape,
    Pass,
    activation_bytes,
    adapter_parameters,
    entropy_bytes,
    kv_cache_bytes,
    logits_bytes,
    model_state_bytes,
    weight_bytes,
)
from align.spec import MODEL_REWARD, PAIR_STAGE_TYPES, POLICY_STAGE_TYPES, AdapterSpec, JobSpec, ResourcesSpec

REFERENCE_FREE = ("orpo", "simpo")
"""Pair stages that hold no reference model."""
REFERENCED = ("dpo", "kto")
"""Stages whose reference may be live or precomputed (``reference``)."""

TRAIN_FLOPS_PER_PARAMETER = 6
"""Forward 2 and backward 4 flops per parameter and token (Kaplan et al. 2020); 8 with recomputation."""
FROZEN_FLOPS_PER_PARAMETER = 2
"""A forward pass without gradients: the reference, rollout log-probs, the reward model, the critic's values."""


@dataclass(frozen=True)
class Device:
    """What a rank runs on, as the planner counts it."""

    key: str
    name: str
    kind: str
    """``cuda`` or ``cpu``."""
    memory: float | None
    """Bytes of one GPU; for ``cpu`` the machine's RAM, which all its ranks share (None: unknown)."""
    bf16_flops: float
    """Peak dense bf16 matrix-product throughput, flop/s (per core on a CPU)."""
    fp32_flops: float
    """Peak dense fp32 matrix-product throughput, flop/s (per core on a CPU; no TF32 on a GPU, as torch's default)."""
    bandwidth: float
    """Memory bandwidth, bytes/s (per core on a CPU)."""
    native_bf16: bool = True
    """Whether ``precision: auto`` trains in bf16 here (:mod:`align.precision`)."""
    utilisation: float = 0.30
    """Assumed fraction of the peak a stage's matrix products reach."""
    layer_seconds: float = 2e-3
    """Assumed least time of one decoder layer's forward pass (a backward counts as two): the kernel
    launch and Python overhead that bounds small passes and every sampling step, whatever the flops
    and the bandwidth."""
    runtime_bytes: float = 1.0 * GiB
    """Memory a rank holds besides tensors: the CUDA context, cuBLAS workspace and allocator slack, or on
    a CPU the Python process with torch, transformers, peft and DeepSpeed imported."""


GPUS = {
    # Memory as nvidia-smi reports it; peaks are the dense (not sparse) tensor-core figures of the SXM parts.
    "h200": Device("h200", "NVIDIA H200 SXM 141 GB", "cuda", 143_771 * 2**20, 989e12, 67e12, 4.8e12),
    "h100": Device("h100", "NVIDIA H100 SXM 80 GB", "cuda", 81_559 * 2**20, 989e12, 67e12, 3.35e12),
    "a100": Device("a100", "NVIDIA A100 SXM 80 GB", "cuda", 81_920 * 2**20, 312e12, 19.5e12, 2.039e12),
}
"""The GPUs ``align plan --gpu`` knows. Utilisation 0.30: align's DPO on an H200 ran at 29% of the bf16
peak counted as here (6 flops per parameter and token trained, 2 for the reference)."""
CPU_FP32_FLOPS = 70e9
"""Per core: a 512x512 fp32 matrix product ran at 139 GFLOP/s on a 2-core Xeon (AVX-512)."""
CPU_BF16_FLOPS = 184e9
"""Per core, with AMX: the same product ran at 368 GFLOP/s in bf16 on that Xeon."""
CPU_EMULATED_BF16_FLOPS = 1.7e9
"""Per core, bf16 emulated (AVX2): one bf16 product ran at 1/40 of fp32 (1.1 against 45.6 GFLOP/s)."""

CPU_RUNTIME_BYTES = 0.7 * GiB
"""A rank of ``align train`` on a CPU besides its tensors: the tiny model's SFT, DPO and GRPO stages (one rank,
bf16) peaked at 709-724 MiB RSS, of which their planned tensors at the worst-case lengths were 55-104 MiB,
leaving 620-665 MiB for Python, the libraries, the tokenizer and the data."""


def cpu_device(memory: float | None = None, native_bf16: bool = False) -> Device:
    """The CPU as a device: ``memory`` is the machine's RAM, ``native_bf16`` whether it computes bf16
    natively (AVX512-BF16 or AMX). Throughput scales with the rank's ``cpus_per_worker``."""
    return Device(
        key="cpu", name="CPU", kind="cpu", memory=memory,
        bf16_flops=CPU_BF16_FLOPS if native_bf16 else CPU_EMULATED_BF16_FLOPS, fp32_flops=CPU_FP32_FLOPS,
        bandwidth=10e9, native_bf16=native_bf16, utilisation=0.50, layer_seconds=1e-3,
        runtime_bytes=CPU_RUNTIME_BYTES,
    )


@dataclass(frozen=True)
class StagePlan:
    """One stage's estimate on one rank. Memory in bytes, time in seconds."""

    name: str
    type: str
    device: str
    precision: str
    """``bf16`` or ``fp32``: ``precision: auto`` resolved for the device."""
    world_size: int
    parameters: int
    """Weights of every model the rank holds (base copies, adapters, reference, critic, reward model)."""
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    buckets: float
    """ZeRO's gradient buckets (and ZeRO-3's gathered layer)."""
    activations: float
    logits: float
    kv_cache: float
    sampling_logits: float
    optimizer_step: float
    """Held only during the optimizer step: the float32 copy of bf16 gradients."""
    runtime: float
    total: float
    """Peak per rank: weights, model states and runtime, plus the largest of training activations with
    logits, sampling's KV cache with its logits, and the optimizer step's copy."""
    offloaded: float
    """Host memory per rank that ``offload_optimizer`` moves the optimizer states to."""
    budget: float | None
    """Memory one rank may use: its share of a GPU, or of the machine's RAM on a CPU."""
    fits: bool | None
    tokens: int
    """Tokens of the sequences one optimizer step trains on, per rank (worst case)."""
    flops: float
    """Matrix-product flops per optimizer step per rank: training, frozen passes and prompt encoding."""
    generation_seconds: float
    step_seconds: float
    notes: tuple[str, ...] = ()

    @property
    def model_states(self) -> float:
        """Gradients, optimizer states and ZeRO buffers: the table's ``grads+optimizer``."""
        return self.gradients + self.optimizer + self.buckets

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes)}


# --- what a stage holds and runs ------------------------------------------------------------------


@dataclass(frozen=True)
class _Resident:
    """A set of weights a rank holds for the stage."""

    role: str
    parameters: int
    weights: float
    trainable: int = 0
    engine: str | None = None
    """The DeepSpeed engine that holds it (ZeRO-3 partitions it, and steps its trainable parameters); None
    for a model loaded beside the engines (a frozen reward model)."""


@dataclass(frozen=True)
class _Train:
    """Passes whose activations are held together until one backward."""

    passes: tuple[Pass, ...]
    head: str = "lm"
    entropy: bool = False
    """PPO computes the entropy over this pass's logits (first epoch)."""


@dataclass(frozen=True)
class _Work:
    """What a rank runs for one micro-batch."""

    trained: tuple[_Train, ...]
    repeats: int = 1
    """Times each trained group runs per micro-batch (PPO's ``ppo_epochs``)."""
    frozen: tuple[tuple[Pass, str], ...] = ()
    """Passes without gradients, with the head each ends in (``lm``: logits over the vocabulary)."""
    prompts: int = 0
    samples: int = 0
    prompt_length: int = 0
    new_tokens: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def _continues_adapter(job: JobSpec, index: int) -> bool:
    """Whether stage ``index`` starts from an earlier adapter, which its frozen reference copies."""
    earlier = any(stage.type in POLICY_STAGE_TYPES for stage in job.stages[:index])
    return job.adapter.is_peft and (earlier or job.base_model.startswith("artifact:"))


def _policy_adapter(job: JobSpec, index: int) -> AdapterSpec:
    """The policy adapter of stage ``index``: a PiSSA or OLoRA adapter an earlier stage of the job saved is
    continued as the plain LoRA adapter of rank 2r it was converted to."""
    earlier = any(stage.type in POLICY_STAGE_TYPES for stage in job.stages[:index])
    if job.adapter.init != "default" and earlier:
        return job.adapter.model_copy(update={"r": 2 * job.adapter.r})
    return job.adapter


def _model(role: str, shape: ModelShape, job: JobSpec, head: str, dtype_bytes: int, engine: str | None,
           trains: bool, adapter_spec: AdapterSpec | None = None) -> list[_Resident]:
    """A base copy with ``head`` and the job's adapter (``adapter_spec`` where given) on it (trainable when
    ``trains``)."""
    adapter = adapter_parameters(shape, adapter_spec or job.adapter, head)
    base = _Resident(role, shape.parameters(head), weight_bytes(shape, dtype_bytes, job.quantization, head),
                     engine=engine)
    if not job.adapter.is_peft:
        return [_Resident(role, base.parameters, base.weights, adapter if trains else 0, engine)]
    return [base, _Resident(f"{role} adapter", adapter, adapter * dtype_bytes, adapter if trains else 0, engine)]


def _adapter_copy(role: str, shape: ModelShape, adapter_spec: AdapterSpec, head: str, dtype_bytes: int,
                  engine: str) -> _Resident:
    adapter = adapter_parameters(shape, adapter_spec, head)
    return _Resident(role, adapter, adapter * dtype_bytes, engine=engine)


def _residents(job: JobSpec, index: int, shape: ModelShape, dtype_bytes: int) -> list[_Resident]:
    stage = job.stages[index]
    if stage.type == "rm":
        return _model("reward model", shape, job, "score", dtype_bytes, "reward model", trains=True)
    policy_adapter = _policy_adapter(job, index)
    held = _model("policy", shape, job, "lm", dtype_bytes, "policy", trains=True, adapter_spec=policy_adapter)
    live_reference = stage.reference == "live" if stage.type in REFERENCED else stage.type not in REFERENCE_FREE
    # A fresh PiSSA/OLoRA adapter's reference is the residual base plus a frozen copy of its starting matrices.
    if live_reference and (_continues_adapter(job, index) or job.adapter.init != "default"):
        held.append(_adapter_copy("reference adapter", shape, policy_adapter, "lm", dtype_bytes, "policy"))
    if stage.type == "ppo":
        held += _model("critic", shape, job, "score", dtype_bytes, "critic", trains=True)
        if stage.critic_init == "reward_model":
            held.append(_adapter_copy("reward adapter", shape, job.adapter, "score", dtype_bytes, "critic"))
        elif stage.reward == MODEL_REWARD:
            held += _model("reward model", shape, job, "score", dtype_bytes, None, trains=False)
    if stage.type in ("grpo", "rloo") and stage.reward == MODEL_REWARD:
        held += _model("reward model", shape, job, "score", dtype_bytes, None, trains=False)
    if getattr(stage, "eval_reward", None) == MODEL_REWARD:  # scores the held-out replies
        held += _model("reward model", shape, job, "score", dtype_bytes, None, trains=False)
    return held


def _work(job: JobSpec, index: int) -> _Work:
    """A micro-batch of stage ``index`` on one rank, at the worst-case lengths."""
    stage = job.stages[index]
    length, batch = stage.max_length, stage.batch_size
    if stage.type == "sft":
        scored = batch * (length - 1) if stage.padding_free else batch * length
        return _Work((_Train((Pass(batch, length, length, scored),)),))
    if stage.type == "rm":
        return _Work((_Train((Pass(2 * batch, length, length, 0),), head="score"),))
    if stage.type in (*PAIR_STAGE_TYPES, "kto"):
        # KTO's rows go through like pairs: each completion, and the completion it takes for the KL estimate.
        scored = 2 * batch * (length - 1) if stage.padding_free else 2 * batch * length
        pairs = Pass(2 * batch, length, length, scored)
        if stage.type in REFERENCE_FREE:
            return _Work((_Train((pairs,)),), notes=("no reference model",))
        live = stage.reference == "live" and job.adapter.is_peft
        note = () if live else ("reference log-probs computed once before training (a table), no reference pass "
                                "per step",)
        return _Work((_Train((pairs,)),), frozen=((pairs, "lm"),) if live else (), notes=note)
    new = stage.max_new_tokens
    prompt = length - new
    if stage.type == "ppo":
        full = Pass(batch, length, length, batch * length)
        values = Pass(batch, length, length, 0)
        frozen = [(full, "lm"), (full, "lm"), (values, "score")]  # rollout log-probs, reference, critic values
        if stage.reward == MODEL_REWARD:
            frozen.append((values, "score"))
        return _Work((_Train((full,), entropy=True), _Train((values,), head="score")), repeats=stage.ppo_epochs,
                     frozen=tuple(frozen), prompts=batch, samples=batch, prompt_length=prompt, new_tokens=new)
    samples = batch * stage.group_size
    if job.deepspeed.gradient_checkpointing:
        # No KV cache under recomputation: every completion carries its own copy of the prompt.
        passes: tuple[Pass, ...] = (Pass(samples, length, length, samples * (new + 1)),)
    else:
        passes = (Pass(batch, prompt, prompt, batch), Pass(samples, new, length, samples * new))
    frozen = [(p, "lm") for p in passes]  # the reference
    if stage.reward == MODEL_REWARD:
        frozen.append((Pass(samples, length, length, 0), "score"))
    return _Work((_Train(passes),), frozen=tuple(frozen), prompts=batch, samples=samples, prompt_length=prompt,
                 new_tokens=new)


# --- the plan ---------------------------------------------------------------------------------------


def resolve_precision(requested: str, device: Device) -> str:
    """``auto`` as :func:`align.precision.resolve` decides it on ``device``: bf16 where it is native."""
    if requested == "auto":
        return "bf16" if device.native_bf16 else "fp32"
    return requested


def default_device(job: JobSpec, index: int = 0) -> Device:
    """An H100 when the stage asks for GPUs, else a CPU of unknown RAM that computes bf16 by emulation."""
    return GPUS["h100"] if job.stage_resources(index).gpus_per_worker > 0 else cpu_device()


def plan_job(job: JobSpec, model_config: Any, device: Device | Callable[[int], Device] | None = None,
             fused_attention: bool | None = None) -> list[StagePlan]:
    """One :class:`StagePlan` per stage of ``job``, for the base model of ``model_config`` (a transformers
    config, or anything with its attributes) on ``device``: one for every stage, or a function of the stage
    index (stages may ask for different resources); :func:`default_device` when None.

    ``fused_attention``: whether attention keeps no score matrix for backward (sdpa's fused kernels);
    by default True unless the config asks for ``eager`` attention.
    """
    shape = ModelShape.from_config(model_config)
    if device is None:
        device = partial(default_device, job)
    device_of = device if callable(device) else (lambda index: device)
    if fused_attention is None:
        implementation = getattr(model_config, "_attn_implementation", None) or getattr(
            model_config, "attn_implementation", None)
        fused_attention = implementation != "eager"
    names = job.stage_names()
    return [_plan_stage(job, i, names[i], shape, device_of(i), fused_attention) for i in range(len(job.stages))]


def _plan_stage(job: JobSpec, index: int, name: str, shape: ModelShape, device: Device, fused: bool) -> StagePlan:
    stage, ds, resources = job.stages[index], job.deepspeed, job.stage_resources(index)
    precision = resolve_precision(ds.precision, device)
    dtype_bytes = 2 if precision == "bf16" else 4
    world = resources.num_workers
    residents = _residents(job, index, shape, dtype_bytes)
    work = _work(job, index)
    notes = list(work.notes)

    # Weights: ZeRO-3 partitions what the engines hold and gathers one layer (and a prefetch bucket) at a time.
    weights = sum(r.weights / (world if ds.zero_stage == 3 and r.engine else 1) for r in residents)
    engines = sorted({r.engine for r in residents if r.engine})
    gathered = 0.0
    if ds.zero_stage == 3 and world > 1:
        gathered = len(engines) * (shape.layer_parameters() + 0.9 * shape.hidden_size**2) * dtype_bytes
    gradients = optimizer = buckets = offloaded = optimizer_step = 0.0
    for engine in engines:
        trainable = sum(r.trainable for r in residents if r.engine == engine)
        states = model_state_bytes(trainable, precision, ds.zero_stage, world, ds.offload_optimizer,
                                   device.kind == "cuda", shape.hidden_size)
        gradients += states.gradients
        optimizer += states.optimizer
        buckets += states.buckets
        offloaded += states.offloaded
        optimizer_step = max(optimizer_step, states.step)
    buckets += gathered

    # Training: the group of passes whose activations and logits peak together.
    activations = logits = 0.0
    for group in work.trained:
        held = activation_bytes(group.passes, shape, dtype_bytes, ds.gradient_checkpointing, fused)
        positions = sum(p.scored for p in group.passes)
        vocabulary = logits_bytes(positions, shape.vocab_size, dtype_bytes, trained=True) if group.head == "lm" else 0
        if group.entropy:
            entropy = positions * shape.vocab_size * dtype_bytes + entropy_bytes(positions, shape.vocab_size,
                                                                                 dtype_bytes)
            vocabulary = max(vocabulary, entropy)
        if held + vocabulary > activations + logits:
            activations, logits = held, vocabulary
    frozen_logits = max((logits_bytes(p.scored, shape.vocab_size, dtype_bytes, trained=False)
                         for p, head in work.frozen if head == "lm"), default=0.0)
    kv_cache = kv_cache_bytes(work.samples, work.prompt_length + work.new_tokens, shape, dtype_bytes)
    sampling_logits = work.samples * shape.vocab_size * 8.0  # float32 logits and their softmax, per step
    transient = max(activations + logits, frozen_logits, kv_cache + sampling_logits, optimizer_step)
    total = device.runtime_bytes + weights + gradients + optimizer + buckets + transient

    # Time per optimizer step: the micro-batches of one rank, one after another; communication left out.
    flops_per_token = 2 * shape.num_layers * sum(lin.in_features * lin.out_features for lin in shape.layer_linears())
    if job.adapter.is_peft:
        flops_per_token += 2 * adapter_parameters(shape, _policy_adapter(job, index), "lm")
    head_flops = 2 * shape.vocab_size * shape.hidden_size
    train_factor = (TRAIN_FLOPS_PER_PARAMETER + (2 if ds.gradient_checkpointing else 0)) / 2
    frozen_factor = FROZEN_FLOPS_PER_PARAMETER / 2

    cores = resources.cpus_per_worker if device.kind == "cpu" else 1
    throughput = (device.bf16_flops if precision == "bf16" else device.fp32_flops) * cores * device.utilisation

    def timed(flops: float, passes: float) -> tuple[float, float]:
        """(flops, seconds) of ``passes`` forward-pass equivalents through every layer: compute bound, but
        never under the per-layer overhead."""
        return flops, max(flops / throughput, passes * shape.num_layers * device.layer_seconds)

    def pass_flops(p: Pass, head: str) -> float:
        return p.tokens * flops_per_token + (p.scored * head_flops if head == "lm" else 0)

    parts = [timed(pass_flops(p, g.head) * train_factor, train_factor) for g in work.trained for p in g.passes]
    parts = parts * work.repeats + [timed(pass_flops(p, head) * frozen_factor, 1) for p, head in work.frozen]
    if work.prompts:
        parts.append(timed(work.prompts * work.prompt_length * flops_per_token, 1))  # prompt encoding
    micro_flops = sum(flops for flops, _ in parts)
    policy_bytes = sum(r.weights for r in residents if r.engine == "policy")
    generation = _generation_seconds(work, shape, dtype_bytes, policy_bytes, device.bandwidth * cores,
                                     device.layer_seconds)
    accumulation = stage.gradient_accumulation_steps
    step_seconds = accumulation * (sum(seconds for _, seconds in parts) + generation)
    tokens = accumulation * sum(p.tokens for p in work.trained[0].passes)  # PPO's critic reads the same tokens

    budget, fits = _fit(resources, device, total + (offloaded if device.kind == "cpu" else 0.0), notes)
    if device.kind == "cuda" and offloaded:
        notes.append(f"optimizer states offloaded to host memory: {offloaded / GiB:.2f} GiB per rank")
    return StagePlan(
        name=name, type=stage.type, device=device.key, precision=precision, world_size=world,
        parameters=sum(r.parameters for r in residents), trainable=sum(r.trainable for r in residents),
        weights=float(weights), gradients=gradients, optimizer=optimizer, buckets=float(buckets),
        activations=float(activations), logits=float(logits), kv_cache=float(kv_cache),
        sampling_logits=sampling_logits if work.samples else 0.0, optimizer_step=optimizer_step,
        runtime=device.runtime_bytes, total=float(total), offloaded=offloaded, budget=budget, fits=fits,
        tokens=tokens, flops=float(accumulation * micro_flops), generation_seconds=accumulation * generation,
        step_seconds=step_seconds, notes=tuple(notes),
    )


def _generation_seconds(work: _Work, shape: ModelShape, dtype_bytes: int, policy_bytes: float, bandwidth: float,
                        layer_seconds: float) -> float:
    """Sampling ``new_tokens`` for ``samples`` rows: every decoding step reads the policy's weights and the
    KV cache so far (memory-bandwidth bound), and takes at least ``layers x layer_seconds``. Prompt
    encoding is counted with the flops."""
    if not work.samples:
        return 0.0
    per_position = kv_cache_bytes(work.samples, 1, shape, dtype_bytes)
    mean_cache = per_position * (work.prompt_length + work.new_tokens / 2)
    per_step = max((policy_bytes + mean_cache) / bandwidth, shape.num_layers * layer_seconds)
    return work.new_tokens * per_step


def _fit(resources: ResourcesSpec, device: Device, need: float, notes: list[str]) -> tuple[float | None, bool | None]:
    """The memory one rank may use, and whether ``need`` fits in it."""
    if device.memory is None:
        return None, None
    if device.kind == "cpu":
        budget = device.memory / resources.num_workers
        if resources.num_workers > 1:
            notes.append(f"the {resources.num_workers} ranks share this machine's RAM")
    elif resources.gpus_per_worker <= 0:
        budget = device.memory
        notes.append(f"the spec asks for no GPU (resources.gpus_per_worker: 0); planned with one {device.key} "
                     "per rank")
    else:
        budget = device.memory * min(resources.gpus_per_worker, 1.0)
    return budget, need <= budget
