"""Supervised fine-tuning: next-token cross-entropy on the assistant tokens only."""

from __future__ import annotations

import torch

from align.engine.build import build_engine
from align.engine.checkpoint import save_checkpoint
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog
from align.evaluate import exact_match
from align.losses.sft import sft_loss
from align.ops.aggregate import accumulation_scale, global_count
from align.ops.logprobs import token_logprobs
from align.stages import common
from align.stages.common import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = common.start(ctx)
    tokenizer, model = common.load_policy(ctx)
    data = common.load_stage_data(ctx, "sft", tokenizer)
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
        batches = [common.collate_for("sft")([data.train[i] for i in rows], pad) for rows in micro_batches]
        # Token-weighted over the whole optimizer step, on every rank alike.
        step_tokens = global_count(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches))
        scale = accumulation_scale(step_tokens, stage.gradient_accumulation_steps, rank.world_size)
        nll_sum = 0.0
        for batch in batches:
            batch = common.to_device(batch, engine.device)
            logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            token_logps = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
            loss_sum, _ = sft_loss(token_logps, batch["loss_mask"][:, 1:])
            engine.backward(loss_sum * scale)
            engine.step()
            nll_sum += loss_sum.item()
            throughput.add(int(batch["attention_mask"].sum()))
        done = step + 1
        if done % stage.log_every == 0 or done == steps:
            (nll_total,) = all_reduce_sum([nll_sum])
            metrics.log(
                {
                    "step": done,
                    "loss": nll_total / step_tokens,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": common.grad_norm(engine),
                    "tokens_per_s": throughput.read(),
                }
            )
        if (stage.eval_every and done % stage.eval_every == 0) or done == steps:
            metrics.log({"step": done, **evaluate(engine, tokenizer, data, ctx, rank)})
        if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < steps:
            save_checkpoint(engine, ctx.checkpoint_dir, done, rank, {"stage": ctx.name})
            common.checkpoint_saved(ctx, done)

    final = common.final_metrics(metrics.records, ["loss", "eval_loss", "eval_exact_match", "tokens_per_s"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    return common.publish(
        ctx, engine.module, tokenizer, rank, kind=_artifact_kind(job), metrics=final, fingerprints=data.fingerprints
    )


@torch.no_grad()
def evaluate(engine, tokenizer, data: common.StageData, ctx: StageContext, rank: Rank) -> dict:
    """Held-out token-mean NLL and, when asked, greedy exact-match accuracy."""
    if not data.eval:
        return {}
    stage = ctx.stage
    engine.eval()
    nll = tokens = 0.0
    shard = data.eval[rank.rank :: rank.world_size]
    # Equal batch counts on every rank: ZeRO-3 gathers parameters collectively in each forward.
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    for b in range(batches):
        rows = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        weight = 1.0 if rows else 0.0
        rows = rows or data.eval[:1]
        batch = common.to_device(common.collate_for("sft")(rows, tokenizer.pad_token_id), engine.device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_sum, count = sft_loss(token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:]), batch["loss_mask"][:, 1:])
        nll += weight * loss_sum.item()
        tokens += weight * count.item()
    nll, tokens = all_reduce_sum([nll, tokens])
    result = {"eval_loss": nll / max(tokens, 1.0)}
    if stage.eval_exact_match:
        result["eval_exact_match"] = exact_match(
            engine.module,
            tokenizer,
            data.eval_rows,
            rank,
            max_prompt_length=stage.max_length,
            synced_gpus=ctx.job.deepspeed.zero_stage == 3,
        )
    engine.train()
    return result


def _artifact_kind(job) -> str:
    return "full" if job.adapter.type == "full" else "adapter"
