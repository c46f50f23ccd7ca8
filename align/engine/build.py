"""A DeepSpeed engine from the job spec."""

from __future__ import annotations

from typing import Any

import torch

from align.engine.dist import Rank
from align.engine.op_locks import use_owned_batons
from align.engine.schedule import make_scheduler
from align.models.adapters import parameter_groups
from align.spec import JobSpec


def deepspeed_config(job: JobSpec, stage: Any, world_size: int, dtype: torch.dtype, hidden_size: int = 0) -> dict:
    """The DeepSpeed JSON config for one stage of ``job``, training in ``dtype`` (the resolved precision), for
    a model of ``hidden_size`` (0: unknown)."""
    ds = job.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        zero.update(zero3_buckets(hidden_size))
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "train_batch_size": stage.batch_size * stage.gradient_accumulation_steps * world_size,
        # fp32 without ZeRO steps the bare torch optimizer: build_engine clips (and keeps the norm) there.
        "gradient_clipping": 0.0 if _bare_optimizer(ds, dtype) else ds.gradient_clipping,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def zero3_buckets(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 sizes for a model of ``hidden_size``, after transformers' DeepSpeed integration (``auto``):
    tensors under ``10 x hidden`` elements (norms, biases, LoRA matrices) stay whole on every rank instead
    of being gathered before each use, parameters are prefetched ``0.9 x hidden²`` elements ahead (about
    one projection matrix), and gradients are reduced in ``hidden²`` buckets. A persistence threshold of 0
    gathers every LoRA matrix and norm separately in every forward and backward: on one GPU that made a
    LoRA DPO step three times slower than without ZeRO."""
    hidden = hidden_size or 4096
    return {
        "stage3_param_persistence_threshold": 10 * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "reduce_bucket_size": hidden * hidden,
    }


def _bare_optimizer(ds, dtype: torch.dtype) -> bool:
    """Whether DeepSpeed steps the torch optimizer itself, with no wrapper that computes the gradient norm."""
    return ds.zero_stage == 0 and dtype == torch.float32


def build_engine(
    model: torch.nn.Module, job: JobSpec, stage: Any, total_steps: int, rank: Rank, *, dtype: torch.dtype,
    lr: float | None = None,
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (CPU Adam when offloading) and the stage's schedule.

    ``total_steps`` counts optimizer steps; ``dtype`` is the precision the stage resolved; ``lr`` overrides
    the stage's peak learning rate (the PPO critic). ``engine.get_global_grad_norm()`` gives the norm of
    the last step's gradients before clipping in every precision and ZeRO stage.
    """
    use_owned_batons()  # ops compiled on first use (CPU Adam) leave no lock behind if this process dies
    import deepspeed

    lr = stage.lr if lr is None else lr
    groups = parameter_groups(model, lr, stage.weight_decay, job.adapter.lora_plus_ratio)
    if job.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, total_steps, stage.warmup_ratio, stage.lr_scheduler),
        config=deepspeed_config(job, stage, rank.world_size, dtype, _hidden_size(model)),
    )
    if _bare_optimizer(job.deepspeed, dtype):
        clip_before_step(engine, optimizer, job.deepspeed.gradient_clipping)
    return engine, optimizer, scheduler


def clip_before_step(engine, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the gradients to ``max_norm`` (0: no clipping) just before each optimizer step, and keep their
    norm as the engine's global gradient norm.

    DeepSpeed's mixed-precision and ZeRO optimizers record that norm; the bare torch optimizer it steps for
    fp32 without ZeRO does not, and its own fp32 clipping throws the norm away. The gradients are already
    averaged over ranks when the optimizer steps, so the local norm is the global one.
    """
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    limit = max_norm if max_norm > 0 else float("inf")

    def before_step(*_):
        engine._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, limit))

    optimizer.register_step_pre_hook(before_step)


def _hidden_size(model: torch.nn.Module) -> int:
    """The model's hidden size from its config (a peft model's base config), 0 when it has none."""
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or 0)
