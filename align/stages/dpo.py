"""Direct Preference Optimization (Rafailov et al. 2023) against the frozen starting policy.

The reference is the policy this stage starts from. With an adapter continued from an earlier stage
it is a frozen copy of that adapter; with a fresh adapter it is the base (adapter disabled); neither
needs a second copy of the base weights. Dropout is off so that at step 0 policy and reference agree
exactly and the sigmoid loss is ln 2.
"""

from __future__ import annotations

import torch

from align.engine.build import build_engine
from align.engine.checkpoint import save_checkpoint
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog
from align.evaluate import exact_match
from align.losses.dpo import DPOOutput, chosen_nll, dpo_loss, implicit_reward_accuracy
from align.models.reference import Reference
from align.ops.aggregate import accumulation_scale, global_count
from align.ops.logprobs import sequence_logprobs
from align.stages import common
from align.stages.common import StageContext, StageResult

# loss = dpo_loss + sft_weight * nll_loss; nll_loss is the chosen responses' length-normalised NLL (RPO's term).
METRIC_KEYS = ["loss", "dpo_loss", "nll_loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"]


def run(ctx: StageContext) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = common.start(ctx)
    tokenizer, model = common.load_policy(ctx)
    common.disable_dropout(model)
    reference = Reference(model, ctx.start_policy) if job.adapter.type != "full" else None
    data = common.load_stage_data(ctx, "preference", tokenizer)
    steps = common.total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=common.dtype_of(ctx))
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics)
    pad = common.pad_id(tokenizer)
    precomputed = None
    if stage.reference == "precomputed" or reference is None:
        precomputed = precompute_reference(engine, reference, data, ctx, rank, pad)
    first_step = common.resume(ctx, engine, rank, metrics)
    if first_step == 0:
        # The starting policy's numbers on the same held-out pairs, for comparison.
        metrics.log({"step": 0, **evaluate(engine, reference, precomputed, tokenizer, data, ctx, rank)})
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
            if precomputed is not None:
                reference_logps = precomputed["train"][rows].to(engine.device)
            else:
                with reference.active():
                    reference_logps = forward_logps(engine, batch)
            policy_logps = forward_logps(engine, batch)
            loss, out, nll = preference_loss(stage, policy_logps, reference_logps, batch["loss_mask"])
            engine.backward(loss * scale)
            engine.step()
            sums += _pair_sums(loss, out, nll)
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
            metrics.log({"step": done, **evaluate(engine, reference, precomputed, tokenizer, data, ctx, rank)})
        if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < steps:
            save_checkpoint(engine, ctx.checkpoint_dir, done, rank, {"stage": ctx.name})
            common.checkpoint_saved(ctx, done)

    final = common.final_metrics(
        metrics.records,
        METRIC_KEYS
        + ["eval_loss", "eval_dpo_loss", "eval_nll_loss", "eval_rewards_accuracy", "eval_rewards_margin", "eval_logp_accuracy", "eval_exact_match"]
        + ["tokens_per_s"],
    )
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    kind = "full" if job.adapter.type == "full" else "adapter"
    return common.publish(ctx, engine.module, tokenizer, rank, kind=kind, metrics=final, fingerprints=data.fingerprints)


def forward_logps(engine, batch: dict) -> torch.Tensor:
    """Summed response log-probs, shape (2 * pairs,): chosen rows first, then rejected."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])


def preference_loss(
    stage, policy_logps: torch.Tensor, reference_logps: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, DPOOutput, torch.Tensor]:
    """A micro-batch's summed loss, ``dpo_loss + sft_weight · chosen NLL``, with the per-pair DPO output
    and chosen NLL. Log-probs are (2 * pairs,), chosen first; ``loss_mask`` (2 * pairs, seq) gives each
    response's scored token count, which IPO averages over and the NLL is normalised by."""
    chosen_lengths, rejected_lengths = loss_mask[:, 1:].sum(-1).chunk(2)
    policy_chosen, policy_rejected = policy_logps.chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        beta=stage.beta,
        loss_type=stage.loss,
        label_smoothing=stage.label_smoothing,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    nll = chosen_nll(policy_chosen, chosen_lengths)
    loss = out.losses.sum()
    if stage.sft_weight:
        loss = loss + stage.sft_weight * nll.sum()
    return loss, out, nll


def _pair_sums(loss: torch.Tensor, out: DPOOutput, nll: torch.Tensor) -> torch.Tensor:
    """Sums over the pairs of a micro-batch, in the order of ``METRIC_KEYS``."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return torch.tensor(
        [
            loss.item(),
            out.losses.sum().item(),
            nll.sum().item(),
            chosen.sum().item(),
            rejected.sum().item(),
            (chosen - rejected).sum().item(),
            implicit_reward_accuracy(chosen, rejected).sum().item(),
        ],
        dtype=torch.float64,
    )


@torch.no_grad()
def precompute_reference(
    engine, reference: Reference | None, data: common.StageData, ctx: StageContext, rank: Rank, pad: int
) -> dict[str, IndexedPairs]:
    """Reference log-probs of every training and held-out pair, computed once: ``{"train", "eval"}``.

    Stored in ``reference_logps.pt`` beside the checkpoints (written whole or not at all) so a resumed
    run reuses them instead of running the reference again. Called before the checkpoint is restored,
    so without a frozen reference (full fine-tuning) the policy's starting weights compute them.
    """
    path = ctx.work_dir / "reference_logps.pt"
    if path.exists():
        tables = torch.load(path)
    else:
        tables = {
            split: _reference_table(engine, reference, rows, ctx.stage.batch_size, pad)
            for split, rows in (("train", data.train), ("eval", data.eval))
        }
        if rank.is_main:
            partial = path.with_suffix(".partial")
            torch.save(tables, partial)
            partial.replace(path)
    return {split: IndexedPairs(table) for split, table in tables.items()}


def _reference_table(engine, reference: Reference | None, rows: list[dict], batch_size: int, pad: int) -> torch.Tensor:
    """(pairs, 2) float32 reference log-probs of ``rows``: chosen in column 0, rejected in column 1."""
    engine.eval()
    chunks = [torch.zeros(0, 2)]
    for begin in range(0, len(rows), batch_size):
        batch = common.to_device(common.collate_for("preference")(rows[begin : begin + batch_size], pad), engine.device)
        if reference is not None:
            with reference.active():
                logps = forward_logps(engine, batch)
        else:
            logps = forward_logps(engine, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        chunks.append(torch.stack([chosen, rejected], dim=1))
    engine.train()
    return torch.cat(chunks)


class IndexedPairs:
    """Reference log-probs looked up by row index, laid out like a preference batch (chosen, then rejected)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        picked = self.table[rows]
        return torch.cat([picked[:, 0], picked[:, 1]])


@torch.no_grad()
def evaluate(engine, reference, precomputed, tokenizer, data: common.StageData, ctx: StageContext, rank: Rank) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin; greedy exact match when asked."""
    if not data.eval:
        return {}
    stage = ctx.stage
    engine.eval()
    shard = list(range(rank.rank, len(data.eval), rank.world_size))
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64)
    pairs = 0.0
    for b in range(batches):
        indices = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        weight = 1.0 if indices else 0.0
        indices = indices or [0]
        rows = [data.eval[i] for i in indices]
        batch = common.to_device(common.collate_for("preference")(rows, tokenizer.pad_token_id), engine.device)
        if precomputed is not None:
            reference_logps = precomputed["eval"][indices].to(engine.device)
        else:
            with reference.active():
                reference_logps = forward_logps(engine, batch)
        policy_logps = forward_logps(engine, batch)
        loss, out, nll = preference_loss(stage, policy_logps, reference_logps, batch["loss_mask"])
        policy_chosen, policy_rejected = policy_logps.chunk(2)
        prefers_chosen = (policy_chosen > policy_rejected).sum().item()
        sums += weight * torch.cat([_pair_sums(loss, out, nll),
                                    torch.tensor([prefers_chosen], dtype=torch.float64)])
        pairs += weight * len(rows)
    totals = all_reduce_sum(sums.tolist() + [pairs])
    pairs = max(totals.pop(), 1.0)
    # logp_accuracy: the policy itself gives the chosen response the higher log-probability.
    result = {"eval_" + key: value / pairs for key, value in zip(METRIC_KEYS + ["logp_accuracy"], totals)}
    if stage.eval_exact_match:
        result["eval_exact_match"] = exact_match(
            engine.module,
            tokenizer,
            data.eval_rows,
            rank,
            max_prompt_length=stage.max_prompt_length or stage.max_length,
            synced_gpus=ctx.job.deepspeed.zero_stage == 3,
        )
    engine.train()
    return result
