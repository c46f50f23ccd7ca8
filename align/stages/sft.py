"""Supervised fine-tuning: next-token cross-entropy on the assistant tokens only."""

from __future__ import annotations

from functools import partial

import torch

from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput
from align.evaluate import exact_match
from align.models.policy import load_policy
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, SFTStage
from align.stages import artifact
from align.stages.batches import input_tokens, packs, scored_nll, scored_tokens, sft_batch
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device


def run(ctx: StageContext[SFTStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    tokenizer, model = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    data = load_stage_data(stage, "sft", tokenizer)
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    models = StageModels(engine, tokenizer, packed=packs(stage, model, ctx.message))
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    first_step = resume(ctx, engine, rank, metrics)["step"]
    pad = tokenizer.pad_token_id
    throughput = Throughput()

    engine.train()
    for step in range(first_step, steps):
        micro_batches = micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        batches = [sft_batch([data.train[i] for i in rows], pad, models.packed) for rows in micro_batches]
        # Token-weighted over the whole optimizer step, on every rank alike.
        step_tokens = global_count(sum(scored_tokens(b) for b in batches))
        scale = accumulation_scale(step_tokens, stage.gradient_accumulation_steps, rank.world_size)
        nll_sum = 0.0
        for batch in batches:
            batch = to_device(batch, engine.device)
            loss_sum = scored_nll(engine, batch)
            engine.backward(loss_sum * scale)
            engine.step()
            nll_sum += loss_sum.item()
            throughput.add(input_tokens(batch))
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput,
            record=partial(_mean_loss, nll_sum, step_tokens),
        )

    final = artifact.final_metrics(metrics.records, [*FINAL_METRICS["sft"], "tokens_per_s"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    kind = "adapter" if job.adapter.is_peft else "full"
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind=kind, metrics=final,
                            fingerprints=data.fingerprints)


def _mean_loss(nll_sum: float, step_tokens: float) -> dict:
    """The step's NLL summed over every rank, per loss token."""
    (nll_total,) = all_reduce_sum([nll_sum])
    return {"loss": nll_total / step_tokens}


@torch.no_grad()
def evaluate(ctx: StageContext[SFTStage], rank: Rank, models: StageModels, data: StageData) -> dict:
    """Held-out token-mean NLL and, when asked, greedy exact-match accuracy."""
    if not data.eval:
        return {}
    stage, engine = ctx.stage, models.engine
    engine.eval()
    nll = tokens = 0.0
    shard = data.eval[rank.rank :: rank.world_size]
    # Equal batch counts on every rank: ZeRO-3 gathers parameters collectively in each forward.
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    for b in range(batches):
        rows = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        weight = 1.0 if rows else 0.0
        rows = rows or data.eval[:1]
        batch = to_device(sft_batch(rows, models.tokenizer.pad_token_id, models.packed), engine.device)
        nll += weight * scored_nll(engine, batch).item()
        tokens += weight * scored_tokens(batch)
    nll, tokens = all_reduce_sum([nll, tokens])
    result = {"eval_loss": nll / max(tokens, 1.0)}
    if stage.eval_exact_match:
        result["eval_exact_match"] = exact_match(
            engine.module,
            models.tokenizer,
            data.eval_rows,
            rank,
            max_prompt_length=stage.max_length,
            synced_gpus=ctx.job.deepspeed.zero_stage == 3,
        )
    engine.train()
    return result
