"""Old import location of the stage pieces, kept while callers move to the modules named below."""

from __future__ import annotations

from align.data.order import micro_batch_indices, steps_per_epoch, total_steps
from align.data.stage_data import StageData, resolve_data_path
from align.data.stage_data import load_stage_data as _load_stage_data
from align.models.policy import disable_dropout, load_policy, load_reward_model_for
from align.stages.artifact import final_metrics, publish
from align.stages.context import StageContext, StageResult, start
from align.stages.loop import MissingCheckpoint, checkpoint_saved, resume, to_device
from align.stages.rollout import completion_batch, completion_logps, group_batch, sampling_seed


def load_stage_data(ctx: StageContext, kind: str, tokenizer) -> StageData:
    return _load_stage_data(ctx.stage, kind, tokenizer)


__all__ = [
    "MissingCheckpoint", "StageContext", "StageData", "StageResult", "checkpoint_saved", "completion_batch",
    "completion_logps", "disable_dropout", "final_metrics", "group_batch", "load_policy", "load_reward_model_for",
    "load_stage_data", "micro_batch_indices", "publish", "resolve_data_path", "resume", "sampling_seed", "start",
    "steps_per_epoch", "to_device", "total_steps",
]
