"""What every stage does the same way: its context, data, batch order, model set-up and artifact.

The stage files (sft.py, rm.py, dpo.py) keep their training loop written out; this module holds the
pieces around the loop so the maths and the bookkeeping live in one place.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align.artifacts import ArtifactStore, PublishedArtifact
from align.data import collate, fingerprint, load, tokenize
from align.engine.checkpoint import complete_checkpoints, load_checkpoint
from align.engine.dist import Rank, all_reduce_sum, init_distributed
from align.engine.metrics import MetricsLog
from align.model_card import base_model_license, base_model_reference, write_model_card
from align.models.adapters import apply_adapter, save_trainable
from align.models.load import load_causal_lm, load_reward_model, load_tokenizer, resolve_base_model
from align.ops.logprobs import token_logprobs
from align.precision import PrecisionChoice, resolve
from align.spec import JobSpec


@dataclass
class StageContext:
    """Everything one stage attempt needs. Built by the local runner or by a Ray worker."""

    job: JobSpec
    index: int
    work_dir: Path
    """This stage's own folder: checkpoints/, metrics.jsonl, the artifact before it is published."""
    artifact_root: str
    start_policy: Path | None = None
    """Local folder of the policy this stage starts from (an earlier stage's artifact), if any."""
    parents: list[str] = field(default_factory=list)
    """Artifact ids this stage builds on, recorded in its manifest."""
    reward_model: Path | None = None
    """Local folder of the reward-model artifact an online stage scores with (``reward: model``)."""
    threads: int | None = None
    resume: bool = True
    """Continue from the newest complete checkpoint in ``work_dir/checkpoints`` if there is one."""
    require_checkpoint: bool = False
    """A retried attempt: finding no checkpoint is an error, never a silent restart from step 0."""
    on_metrics: Callable[[dict], None] | None = None
    on_samples: Callable[[list[dict]], None] | None = None
    """Called on the main rank with sampled completions (step, prompt, completion, score) as they are logged."""
    on_checkpoint: Callable[[int, str], None] | None = None
    """Called on every rank with (step, folder) once the checkpoint after that step is complete."""
    on_message: Callable[[str, str], None] | None = None
    """Called on the main rank with (text, level) for what the stage reports in words (level info or warning)."""
    job_id: str | None = None
    precision: PrecisionChoice | None = None
    """What the stage trains in and why; set by :func:`start` from ``deepspeed.precision`` and the hardware."""

    @property
    def stage(self) -> Any:
        return self.job.stages[self.index]

    @property
    def name(self) -> str:
        return self.job.stage_names()[self.index]

    @property
    def lineage(self) -> str:
        return f"{self.job.name}.{self.name}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"


@dataclass
class StageResult:
    artifact: PublishedArtifact
    metrics: dict


# --- start-up -------------------------------------------------------------------------------------


def start(ctx: StageContext) -> Rank:
    """Join the process group, choose the precision, and seed every generator from the stage seed.

    The stage's first message says which precision it trains in and why (a warning when an explicit bf16
    runs on hardware that emulates it)."""
    rank = init_distributed(ctx.threads)
    ctx.precision = agree_on_precision(resolve(ctx.job.deepspeed.precision))
    if rank.is_main:
        message(ctx, ctx.precision.summary())
        if ctx.precision.warning:
            message(ctx, ctx.precision.warning, "warning")
    seed_everything(ctx.stage.seed)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    return rank


def agree_on_precision(choice: PrecisionChoice) -> PrecisionChoice:
    """One precision for every rank: ``auto`` falls back to fp32 on all ranks if any rank lacks native bf16."""
    if choice.requested != "auto":
        return choice
    bf16_ranks, world = all_reduce_sum([float(choice.precision == "bf16"), 1.0])
    if choice.precision == "bf16" and bf16_ranks < world:
        lacking = f"{int(world - bf16_ranks)} of {int(world)} ranks lack native bf16"
        return replace(choice, precision="fp32", reason=lacking)
    return choice


def message(ctx: StageContext, text: str, level: str = "info") -> None:
    """Report ``text`` through ``ctx.on_message`` (a job event in the service); call on the main rank."""
    if ctx.on_message is not None:
        ctx.on_message(text, level)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def dtype_of(ctx: StageContext) -> torch.dtype:
    """The dtype the stage loads its models in: that of the precision :func:`start` chose."""
    if ctx.precision is None:
        raise RuntimeError("the stage's precision is chosen in common.start(); call it first")
    return ctx.precision.dtype


# --- data -----------------------------------------------------------------------------------------


def resolve_data_path(path: str) -> Path:
    """A local file for a spec's data location: a built-in dataset, a path, or a ``file://`` URL."""
    if path.startswith("builtin:"):
        from align.task import materialize

        return materialize(path)
    return Path(path.removeprefix("file://"))


@dataclass
class StageData:
    train: list[dict]
    eval: list[dict]
    eval_rows: list[dict]
    """Held-out rows as loaded (before tokenising), for generation-based evaluation."""
    format: str
    fingerprints: dict[str, str]
    dropped: int


def load_stage_data(ctx: StageContext, kind: str, tokenizer) -> StageData:
    """Load, check, split and tokenise the stage's rows. Bad rows raise :class:`DataError`."""
    spec = ctx.stage.data
    stage = ctx.stage
    paths = {"train": resolve_data_path(spec.path)}
    if spec.eval_path:
        paths["eval"] = resolve_data_path(spec.eval_path)
    fingerprints = {name: fingerprint.file_fingerprint(p) for name, p in paths.items()}

    train_ds = load.load_rows(str(paths["train"]))
    fmt = load.detect_format(train_ds, kind, str(paths["train"]))
    load.validate_rows(train_ds, fmt, str(paths["train"]), kind=kind)
    train_rows = list(train_ds)
    random.Random(stage.seed).shuffle(train_rows)
    if "eval" in paths:
        eval_ds = load.load_rows(str(paths["eval"]))
        eval_fmt = load.detect_format(eval_ds, kind, str(paths["eval"]))
        load.validate_rows(eval_ds, eval_fmt, str(paths["eval"]), kind=kind)
        eval_rows = list(eval_ds)
    else:
        eval_fmt = fmt
        held_out = round(spec.eval_fraction * len(train_rows))
        eval_rows, train_rows = train_rows[:held_out], train_rows[held_out:]
    if spec.max_rows is not None:
        train_rows = train_rows[: spec.max_rows]

    max_prompt = getattr(stage, "max_prompt_length", None)

    def encode(rows: list[dict], row_fmt: str) -> tuple[list[dict], int]:
        out, dropped = [], 0
        for row in rows:
            if kind == "sft":
                item = tokenize.tokenize_sft(row, row_fmt, tokenizer, stage.max_length, stage.truncation)
            elif kind == "prompt":
                # Room is left for the sampled completion; the prompt loses its start if too long.
                item = tokenize.tokenize_prompt(row, row_fmt, tokenizer, stage.max_length - stage.max_new_tokens)
                item["prompt"] = tokenize.prompt_and_reference(row, row_fmt)[0]
            else:
                item = tokenize.tokenize_preference(row, row_fmt, tokenizer, stage.max_length, max_prompt)
            if item is None:
                dropped += 1
            else:
                out.append(item)
        return out, dropped

    train, dropped = encode(train_rows, fmt)
    evaluation, _ = encode(eval_rows, eval_fmt)
    if not train:
        raise load.DataError(str(paths["train"]), None, None, "no usable rows after tokenisation; check max_length")
    for row in eval_rows:
        row["_format"] = eval_fmt
    return StageData(train, evaluation, eval_rows, fmt, fingerprints, dropped)


# --- batch order ----------------------------------------------------------------------------------


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    return max(1, math.ceil(num_rows / global_batch))


def total_steps(stage: Any, num_rows: int, world_size: int) -> int:
    if stage.max_steps is not None:
        return stage.max_steps
    global_batch = stage.batch_size * stage.gradient_accumulation_steps * world_size
    return max(1, math.ceil(stage.epochs * steps_per_epoch(num_rows, global_batch)))


def micro_batch_indices(
    num_rows: int, step: int, batch_size: int, accumulation: int, rank: Rank, seed: int
) -> list[list[int]]:
    """Row indices of this rank's micro-batches for optimizer step ``step``.

    The order is a pure function of (seed, step): each epoch is a fresh permutation, a global batch
    takes the next ``batch_size * accumulation * world_size`` rows of it (wrapping around to the
    epoch's start to fill the last one), and micro-batch m of rank r takes slice (m * world + r).
    Resuming at a step therefore needs no saved sampler state, and 8x1 and 2x4 accumulation see
    the same rows in each step.
    """
    global_batch = batch_size * accumulation * rank.world_size
    epoch, position = divmod(step, steps_per_epoch(num_rows, global_batch))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_rows, generator=generator).tolist()
    rows = [order[(position * global_batch + j) % num_rows] for j in range(global_batch)]
    slices = []
    for m in range(accumulation):
        begin = (m * rank.world_size + rank.rank) * batch_size
        slices.append(rows[begin : begin + batch_size])
    return slices


def completion_batch(prompts: list[dict], completions: list, pad: int) -> dict:
    """Prompt plus sampled completion (``align.generation.Completion``), right-padded, with
    ``loss_mask`` on the completion tokens (EOS included)."""
    features = []
    for completion in completions:
        prompt_ids = prompts[completion.prompt_index]["prompt_input_ids"]
        features.append({
            "input_ids": list(prompt_ids) + completion.token_ids,
            "loss_mask": [0] * len(prompt_ids) + [1] * len(completion.token_ids),
        })
    return collate.collate_sft(features, pad)


def group_batch(prompts: list[dict], completions: list, group_size: int, pad: int) -> dict:
    """Prompts once (left-padded: ``prompt_ids``, ``prompt_mask``, (prompts, P)) and their completions
    (right-padded: ``completion_ids``, ``completion_mask``, (prompts * group_size, C)), completion ``i``
    continuing prompt ``i // group_size``. The mask is 1 on every completion token, EOS included."""
    prompt_ids = [list(p["prompt_input_ids"]) for p in prompts]
    completion_ids = [c.token_ids for c in completions]
    return {
        "prompt_ids": collate.pad_sequences(prompt_ids, pad, side="left"),
        "prompt_mask": collate.pad_sequences([[1] * len(ids) for ids in prompt_ids], 0, side="left"),
        "completion_ids": collate.pad_sequences(completion_ids, pad),
        "completion_mask": collate.pad_sequences([[1] * len(ids) for ids in completion_ids], 0),
    }


def completion_logps(model, batch: dict, group_size: int, shared_prefix: bool = True) -> torch.Tensor:
    """Log-probs of every completion token of a :func:`group_batch`, (prompts * group_size, C).

    With ``shared_prefix`` each prompt is encoded once: a forward over the prompts fills a KV cache,
    the cache is repeated for the ``group_size`` completions of each prompt, and a forward over the
    completions reads it. This gives the values of a forward over prompt + completion (the prompt's
    keys and values do not depend on the completion) for a fraction of the prompt work, and the
    gradient flows through the shared prompt pass. Without it (gradient checkpointing keeps no
    cache), every completion runs with its own copy of the prompt.
    """
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    offsets = torch.arange(1, completion_ids.shape[1] + 1, device=completion_ids.device)
    completion_positions = positions[:, -1:].repeat_interleave(group_size, dim=0) + offsets
    attention = torch.cat([prompt_mask.repeat_interleave(group_size, dim=0), completion_mask], dim=1)
    if not shared_prefix:
        logits = model(
            input_ids=torch.cat([prompt_ids.repeat_interleave(group_size, dim=0), completion_ids], dim=1),
            attention_mask=attention,
            position_ids=torch.cat([positions.repeat_interleave(group_size, dim=0), completion_positions], dim=1),
        ).logits[:, prompt_ids.shape[1] - 1 : -1]
        return token_logprobs(logits, completion_ids)
    from transformers import DynamicCache

    from align.generation import cache_argument

    cache = DynamicCache()  # filled in place by the prompt pass
    prompt = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_argument(model, cache))
    cache.batch_repeat_interleave(group_size)
    logits = model(input_ids=completion_ids, attention_mask=attention, position_ids=completion_positions,
                   use_cache=True, **cache_argument(model, cache)).logits
    # The first completion token is predicted at the prompt's last position.
    logits = torch.cat([prompt.logits[:, -1:].repeat_interleave(group_size, dim=0), logits[:, :-1]], dim=1)
    return token_logprobs(logits, completion_ids)


def sampling_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A distinct, reproducible sampling stream per (seed, step, rank, micro-batch): resuming at a
    step samples the same completions an uninterrupted run would."""
    return (seed * 1_000_003 + step) * 65_537 + rank * 1_024 + micro


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id


# --- models ---------------------------------------------------------------------------------------


def load_policy(ctx: StageContext):
    """Tokenizer and trainable policy: the base model, continued from ``start_policy`` when given."""
    job = ctx.job
    base = resolve_base_model(job.base_model, progress=lambda text: message(ctx, text))
    tokenizer = load_tokenizer(base)
    full_start = job.adapter.type == "full" and ctx.start_policy is not None
    model = load_causal_lm(ctx.start_policy if full_start else base, dtype_of(ctx), job.quantization)
    model = apply_adapter(
        model,
        job.adapter,
        task_type="CAUSAL_LM",
        quantized=job.quantization is not None,
        init_from=ctx.start_policy if job.adapter.type != "full" else None,
        gradient_checkpointing=job.deepspeed.gradient_checkpointing,
    )
    return tokenizer, model


def load_reward_model_for(ctx: StageContext):
    """Tokenizer and trainable reward model: a scalar head on the starting policy or on the base."""
    from align.models.reward import merge_policy_adapter

    job = ctx.job
    base = resolve_base_model(job.base_model, progress=lambda text: message(ctx, text))
    tokenizer = load_tokenizer(base)
    from_policy = ctx.stage.init == "policy" and ctx.start_policy is not None
    full_start = from_policy and job.adapter.type == "full"
    model = load_reward_model(
        ctx.start_policy if full_start else base, dtype_of(ctx), tokenizer.pad_token_id, job.quantization
    )
    if from_policy and not full_start:
        # The policy's adapter becomes part of the reward model's frozen body.
        model = merge_policy_adapter(model, ctx.start_policy)
    model = apply_adapter(
        model,
        job.adapter,
        task_type="SEQ_CLS",
        quantized=job.quantization is not None,
        gradient_checkpointing=job.deepspeed.gradient_checkpointing,
    )
    return tokenizer, model


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# --- resume ---------------------------------------------------------------------------------------


class MissingCheckpoint(RuntimeError):
    pass


def checkpoint_saved(ctx: StageContext, step: int) -> None:
    """Tell ``ctx.on_checkpoint``, if set, that the checkpoint after ``step`` is complete."""
    if ctx.on_checkpoint is not None:
        ctx.on_checkpoint(step, str(dict(complete_checkpoints(ctx.checkpoint_dir))[step]))


def resume(ctx: StageContext, engine, rank: Rank, metrics: MetricsLog) -> int:
    """Restore the newest complete checkpoint; returns the number of optimizer steps already done."""
    return resume_state(ctx, engine, rank, metrics)["step"]


def resume_state(ctx: StageContext, engine, rank: Rank, metrics: MetricsLog, others: dict | None = None) -> dict:
    """Restore the newest complete checkpoint (of ``engine`` and the ``others`` saved beside it);
    returns the state saved with it, ``{"step": 0}`` when starting afresh."""
    found = complete_checkpoints(ctx.checkpoint_dir) if ctx.resume else []
    if not found:
        if ctx.require_checkpoint:
            raise MissingCheckpoint(
                f"expected a checkpoint under {ctx.checkpoint_dir} to resume from, found none"
            )
        return {"step": 0}
    state = load_checkpoint(engine, found[-1][1], rank, others)
    metrics.truncate_after(state["step"])
    return state


# --- metrics and artifact -------------------------------------------------------------------------


class Throughput:
    """Tokens (and samples) per second over the steps since the last reading, summed over ranks."""

    def __init__(self):
        import time

        self._clock = time.perf_counter
        self.start = self._clock()
        self.tokens = 0
        self.samples = 0
        self.samples_per_s = 0.0
        """Samples per second over the window of the last :meth:`read`."""

    def add(self, tokens: int, samples: int = 0) -> None:
        self.tokens += tokens
        self.samples += samples

    def read(self) -> float:
        """Tokens per second since the last reading (``samples_per_s`` is set for the same window)."""
        now = self._clock()
        total, samples = all_reduce_sum([float(self.tokens), float(self.samples)])
        elapsed = max(now - self.start, 1e-9)
        self.start, self.tokens, self.samples = now, 0, 0
        self.samples_per_s = samples / elapsed
        return total / elapsed


def grad_norm(engine) -> float:
    """The global gradient norm of the last optimizer step (NaN before the first)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def publish(
    ctx: StageContext,
    model: torch.nn.Module,
    tokenizer,
    rank: Rank,
    *,
    kind: str,
    metrics: dict,
    fingerprints: dict[str, str],
) -> StageResult:
    """Save what the stage trained with its model card and publish it as a versioned artifact (manifest
    written last). ``adapter_config.json`` and the card name the base model as the spec did
    (:func:`align.model_card.base_model_reference`), never the local folder it was loaded from."""
    out_dir = ctx.work_dir / "artifact"
    base_reference = base_model_reference(ctx.job.base_model)
    save_trainable(model, out_dir, ctx.job.deepspeed.zero_stage, write=rank.is_main, base_model=base_reference)
    published = None
    if rank.is_main:
        tokenizer.save_pretrained(out_dir)
        for log in ("metrics.jsonl", "samples.jsonl"):
            if (ctx.work_dir / log).exists():
                (out_dir / log).write_bytes((ctx.work_dir / log).read_bytes())
        precision = ctx.precision.to_dict() if ctx.precision else None
        write_model_card(
            out_dir, ctx.job, ctx.index, kind=kind, lineage=ctx.lineage, parents=list(ctx.parents),
            data_fingerprints=fingerprints, metrics=metrics, precision=precision, job_id=ctx.job_id,
            license=base_model_license(resolve_base_model(ctx.job.base_model)),
        )
        published = ArtifactStore(ctx.artifact_root).publish(
            out_dir,
            lineage=ctx.lineage,
            kind=kind,
            stage={"type": ctx.stage.type, "index": ctx.index, "name": ctx.name},
            base_model=ctx.job.base_model,
            spec_hash=ctx.job.hash(),
            parents=list(ctx.parents),
            data_fingerprints=fingerprints,
            metrics=metrics,
            job={"id": ctx.job_id, "name": ctx.job.name},
            precision=precision,
        )
    published = _broadcast(published)
    return StageResult(published, metrics)


def _broadcast(obj):
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def log_samples(ctx: StageContext, step: int, samples: list[dict]) -> None:
    """Append sampled completions (prompt, completion, score) after ``step`` to ``samples.jsonl``
    and pass each to ``ctx.on_samples``; call on the main rank."""
    import json

    records = [{"step": step, **sample} for sample in samples]
    with (ctx.work_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    if ctx.on_samples is not None:
        ctx.on_samples(records)


def final_metrics(records: list[dict], keys: list[str]) -> dict:
    """The last value of each key among the logged records."""
    out: dict[str, Any] = {}
    for record in records:
        for key in keys:
            if key in record:
                out[key] = record[key]
    return out


def collate_for(kind: str):
    return collate.collate_sft if kind == "sft" else collate.collate_preference
