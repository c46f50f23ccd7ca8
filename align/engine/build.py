"""A DeepSpeed engine from the job spec."""

from __future__ import annotations

from typing import Any

import torch

from align.engine.dist import Rank
from align.engine.schedule import make_scheduler
from align.models.adapters import parameter_groups
from align.spec import JobSpec


def deepspeed_config(job: JobSpec, stage: Any, world_size: int) -> dict:
    """The DeepSpeed JSON config for one stage of ``job``."""
    ds = job.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.zero_stage == 3:
        # Gather whole layers at once; the defaults are tuned for billion-parameter layers.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
    return {
        "train_micro_batch_size_per_gpu": stage.batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "train_batch_size": stage.batch_size * stage.gradient_accumulation_steps * world_size,
        "gradient_clipping": ds.gradient_clipping,
        "bf16": {"enabled": ds.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: torch.nn.Module, job: JobSpec, stage: Any, total_steps: int, rank: Rank, lr: float | None = None
):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (CPU Adam when offloading) and the stage's schedule.

    ``total_steps`` counts optimizer steps; ``lr`` overrides the stage's peak learning rate (the PPO critic).
    """
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
        config=deepspeed_config(job, stage, rank.world_size),
    )
    return engine, optimizer, scheduler
