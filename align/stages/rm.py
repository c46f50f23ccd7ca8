"""Reward model: a scalar head trained with the Bradley-Terry pairwise loss (InstructGPT Eq. 1)."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import torch

from align.data.collate import collate_preference
from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput, means_over_ranks
from align.losses.reward import pairwise_accuracy, pairwise_reward_loss
from align.models.policy import load_reward_model_for
from align.models.reward import BODY_DIR
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, RewardModelStage
from align.stages import artifact
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device

METRIC_KEYS = ["loss", "accuracy", "margin", "reward_mean"]


def run(ctx: StageContext[RewardModelStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    start_from = ctx.start_policy if stage.init == "policy" else None
    tokenizer, model = load_reward_model_for(job, start_from, ctx.dtype, ctx.message, ctx.artifact_root)
    data = load_stage_data(stage, "preference", tokenizer)
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    models = StageModels(engine, tokenizer)
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    first_step = resume(ctx, engine, rank, metrics)["step"]
    pad = tokenizer.pad_token_id
    throughput = Throughput()

    engine.train()
    for step in range(first_step, steps):
        micro_batches = micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        step_pairs = global_count(sum(len(rows) for rows in micro_batches))
        scale = accumulation_scale(step_pairs, stage.gradient_accumulation_steps, rank.world_size)
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        for rows in micro_batches:
            batch = to_device(collate_preference([data.train[i] for i in rows], pad), engine.device)
            chosen, rejected = rewards(engine, batch).chunk(2)
            losses = pairwise_reward_loss(chosen, rejected)
            engine.backward(losses.sum() * scale)
            engine.step()
            sums += _pair_sums(losses, chosen, rejected)
            throughput.add(int(batch["attention_mask"].sum()))
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput,
            record=partial(means_over_ranks, METRIC_KEYS, sums, step_pairs),
        )

    final = artifact.final_metrics(metrics.records, FINAL_METRICS["rm"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    if rank.is_main and stage.init == "policy" and ctx.start_policy is not None and job.adapter.is_peft:
        # The policy adapter merged into the body travels with the reward model's own adapter.
        body = ctx.work_dir / "artifact" / BODY_DIR
        body.mkdir(parents=True, exist_ok=True)
        for adapter_file in Path(ctx.start_policy).glob("adapter_*"):
            shutil.copyfile(adapter_file, body / adapter_file.name)
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind="reward_model", metrics=final,
                            fingerprints=data.fingerprints)


def rewards(engine, batch: dict) -> torch.Tensor:
    """Scalar reward per sequence, shape (2 * pairs,), read at the last non-padding token."""
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()


def _pair_sums(losses, chosen, rejected) -> torch.Tensor:
    return torch.tensor(
        [
            losses.sum().item(),
            pairwise_accuracy(chosen, rejected).sum().item(),
            (chosen - rejected).sum().item(),
            ((chosen + rejected) / 2).sum().item(),
        ],
        dtype=torch.float64,
    )


@torch.no_grad()
def evaluate(ctx: StageContext[RewardModelStage], rank: Rank, models: StageModels, data: StageData) -> dict:
    """Held-out pairwise loss, accuracy and margin."""
    if not data.eval:
        return {}
    stage, engine = ctx.stage, models.engine
    engine.eval()
    shard = data.eval[rank.rank :: rank.world_size]
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
    pairs = 0.0
    for b in range(batches):
        rows = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        weight = 1.0 if rows else 0.0
        rows = rows or data.eval[:1]
        batch = to_device(collate_preference(rows, models.tokenizer.pad_token_id), engine.device)
        chosen, rejected = rewards(engine, batch).chunk(2)
        sums += weight * _pair_sums(pairwise_reward_loss(chosen, rejected), chosen, rejected)
        pairs += weight * len(rows)
    totals = all_reduce_sum([*sums.tolist(), pairs])
    pairs = max(totals.pop(), 1.0)
    engine.train()
    return {"eval_" + key: value / pairs for key, value in zip(METRIC_KEYS, totals)}
