"""Reward model: a scalar head trained with the Bradley-Terry pairwise loss (InstructGPT Eq. 1)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from align.engine.build import build_engine
from align.engine.checkpoint import save_checkpoint
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog
from align.losses.reward import pairwise_accuracy, pairwise_reward_loss
from align.models.reward import BODY_DIR
from align.ops.aggregate import accumulation_scale, global_count
from align.stages import common
from align.stages.common import StageContext, StageResult

METRIC_KEYS = ["loss", "accuracy", "margin", "reward_mean"]


def run(ctx: StageContext) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = common.start(ctx)
    tokenizer, model = common.load_reward_model_for(ctx)
    data = common.load_stage_data(ctx, "preference", tokenizer)
    steps = common.total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=common.dtype_of(ctx))
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics)
    first_step = common.resume(ctx, engine, rank, metrics)
    pad = common.pad_id(tokenizer)
    throughput = common.Throughput()

    engine.train()
    for step in range(first_step, steps):
        micro_batches = common.micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        step_pairs = global_count(sum(len(rows) for rows in micro_batches))
        scale = accumulation_scale(step_pairs, stage.gradient_accumulation_steps, rank.world_size)
        sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
        for rows in micro_batches:
            batch = common.to_device(common.collate_for("preference")([data.train[i] for i in rows], pad), engine.device)
            chosen, rejected = rewards(engine, batch).chunk(2)
            losses = pairwise_reward_loss(chosen, rejected)
            engine.backward(losses.sum() * scale)
            engine.step()
            sums += _pair_sums(losses, chosen, rejected)
            throughput.add(int(batch["attention_mask"].sum()))
        done = step + 1
        if done % stage.log_every == 0 or done == steps:
            totals = all_reduce_sum(sums.tolist())
            record = {key: value / step_pairs for key, value in zip(METRIC_KEYS, totals)}
            record.update(
                step=done, lr=scheduler.get_last_lr()[0], grad_norm=common.grad_norm(engine), tokens_per_s=throughput.read()
            )
            metrics.log(record)
        if (stage.eval_every and done % stage.eval_every == 0) or done == steps:
            metrics.log({"step": done, **evaluate(engine, tokenizer, data, stage, rank)})
        if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < steps:
            save_checkpoint(engine, ctx.checkpoint_dir, done, rank, {"stage": ctx.name})
            common.checkpoint_saved(ctx, done)

    final = common.final_metrics(metrics.records, METRIC_KEYS + ["eval_loss", "eval_accuracy", "eval_margin"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    if rank.is_main and stage.init == "policy" and ctx.start_policy is not None and job.adapter.type != "full":
        # The policy adapter merged into the body travels with the reward model's own adapter.
        body = ctx.work_dir / "artifact" / BODY_DIR
        body.mkdir(parents=True, exist_ok=True)
        for adapter_file in Path(ctx.start_policy).glob("adapter_*"):
            shutil.copyfile(adapter_file, body / adapter_file.name)
    return common.publish(
        ctx, engine.module, tokenizer, rank, kind="reward_model", metrics=final, fingerprints=data.fingerprints
    )


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
def evaluate(engine, tokenizer, data: common.StageData, stage, rank: Rank) -> dict:
    """Held-out pairwise loss, accuracy and margin."""
    if not data.eval:
        return {}
    engine.eval()
    shard = data.eval[rank.rank :: rank.world_size]
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64)
    pairs = 0.0
    for b in range(batches):
        rows = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        weight = 1.0 if rows else 0.0
        rows = rows or data.eval[:1]
        batch = common.to_device(common.collate_for("preference")(rows, tokenizer.pad_token_id), engine.device)
        chosen, rejected = rewards(engine, batch).chunk(2)
        sums += weight * _pair_sums(pairwise_reward_loss(chosen, rejected), chosen, rejected)
        pairs += weight * len(rows)
    totals = all_reduce_sum(sums.tolist() + [pairs])
    pairs = max(totals.pop(), 1.0)
    engine.train()
    return {"eval_" + key: value / pairs for key, value in zip(METRIC_KEYS, totals)}
