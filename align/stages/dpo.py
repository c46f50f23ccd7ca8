"""Direct Preference Optimization (Rafailov et al. 2023) against the frozen starting policy.

The reference is the policy this stage starts from. With an adapter continued from an earlier stage
it is a frozen copy of that adapter; with a fresh adapter it is the base (adapter disabled); neither
needs a second copy of the base weights. With ``reference: precomputed``, and always with full
fine-tuning (no frozen copy to run), the reference log-probs of every training and held-out pair are
computed once before training. Dropout is off so that at step 0 policy and reference agree exactly
and the sigmoid loss is ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput, means_over_ranks
from align.evaluate import exact_match
from align.evaluate_generations import pair_stage_replies
from align.losses.dpo import DPOOutput, chosen_nll, dpo_loss, implicit_reward_accuracy
from align.models.policy import disable_dropout, load_policy
from align.models.reference import Reference
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, DPOStage
from align.stages import artifact
from align.stages.batches import (
    Batch,
    held_out_pair_batches,
    input_tokens,
    packs,
    preference_batch,
    response_lengths,
    sequence_logps,
)
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device

# loss = dpo_loss + sft_weight * nll_loss; nll_loss is the chosen responses' length-normalised NLL (RPO's term).
METRIC_KEYS = [
    "loss", "dpo_loss", "nll_loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy",
]


@dataclass
class DPOModels(StageModels):
    reference: Reference | None
    """The frozen starting policy beside the trained one; ``None`` with full fine-tuning."""
    precomputed: dict[str, IndexedPairs] | None = None
    """Reference log-probs of the ``train`` and ``eval`` pairs when computed once before training."""


def run(ctx: StageContext[DPOStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    tokenizer, model = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    disable_dropout(model)
    reference = Reference(model, ctx.start_policy) if job.adapter.is_peft else None
    data = load_stage_data(stage, "preference", tokenizer)
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    models = DPOModels(engine, tokenizer, reference, packed=packs(stage, model, ctx.message))
    if stage.reference == "precomputed" or reference is None:
        models.precomputed = precompute_reference(ctx, rank, models, data)
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    first_step = resume(ctx, engine, rank, metrics)["step"]
    models.replies = pair_stage_replies(ctx, rank, engine, tokenizer, data.eval_rows, first_step)
    if first_step == 0 and (held_out := evaluate(ctx, rank, models, data)):
        # The starting policy's numbers on the same held-out pairs, for comparison.
        metrics.log({"step": 0, **held_out})
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
            batch = to_device(preference_batch([data.train[i] for i in rows], pad, models.packed), engine.device)
            reference_logps = reference_logps_of(models, batch, "train", rows)
            policy_logps = sequence_logps(engine, batch)
            loss, out, nll = preference_loss(stage, policy_logps, reference_logps, response_lengths(batch))
            engine.backward(loss * scale)
            engine.step()
            sums += _pair_sums(loss, out, nll)
            throughput.add(input_tokens(batch))
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput,
            record=partial(means_over_ranks, METRIC_KEYS, sums, step_pairs),
        )

    final = artifact.final_metrics(metrics.records, [*FINAL_METRICS["dpo"], "tokens_per_s"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    kind = "adapter" if job.adapter.is_peft else "full"
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind=kind, metrics=final,
                            fingerprints=data.fingerprints)


def reference_logps_of(models: DPOModels, batch: Batch, split: str, rows: list[int]) -> torch.Tensor:
    """The reference's (2 * pairs,) log-probs of ``batch``, rows ``rows`` of ``split``: looked up when
    precomputed, else a forward of the frozen reference."""
    if models.precomputed is not None:
        return models.precomputed[split][rows].to(models.engine.device)
    with models.reference.active():
        return sequence_logps(models.engine, batch)


def preference_loss(
    stage: DPOStage, policy_logps: torch.Tensor, reference_logps: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, DPOOutput, torch.Tensor]:
    """A micro-batch's summed loss, ``dpo_loss + sft_weight · chosen NLL``, with the per-pair DPO output
    and chosen NLL. Log-probs are (2 * pairs,), chosen first; ``lengths`` (2 * pairs,) are each
    response's scored token counts, which IPO averages over and the NLL is normalised by."""
    chosen_lengths, rejected_lengths = lengths.chunk(2)
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


# --- reference log-probs computed once ------------------------------------------------------------


@torch.no_grad()
def precompute_reference(
    ctx: StageContext[DPOStage], rank: Rank, models: DPOModels, data: StageData
) -> dict[str, IndexedPairs]:
    """Reference log-probs of every training and held-out pair, computed once: ``{"train", "eval"}``.

    Stored in ``reference_logps.pt`` beside the checkpoints (written whole or not at all) so a resumed
    run reuses them instead of running the reference again. Called before the checkpoint is restored,
    so without a frozen reference (full fine-tuning) the policy's starting weights compute them.
    """
    path = ctx.work_dir / "reference_logps.pt"
    tables = torch.load(path) if path.exists() else None
    if not isinstance(tables, dict):  # none yet, or a train-only table from before held-out pairs were kept
        tables = {
            split: _reference_table(models, rows, ctx.stage.batch_size)
            for split, rows in (("train", data.train), ("eval", data.eval))
        }
        if rank.is_main:
            unfinished = path.with_suffix(".partial")
            torch.save(tables, unfinished)
            unfinished.replace(path)
    return {split: IndexedPairs(table) for split, table in tables.items()}


def _reference_table(models: DPOModels, rows: list[dict], batch_size: int) -> torch.Tensor:
    """(pairs, 2) float32 reference log-probs of ``rows``: chosen in column 0, rejected in column 1."""
    engine = models.engine
    engine.eval()
    chunks = [torch.zeros(0, 2)]
    for begin in range(0, len(rows), batch_size):
        batch = to_device(
            preference_batch(rows[begin : begin + batch_size], models.tokenizer.pad_token_id, models.packed),
            engine.device,
        )
        if models.reference is not None:
            with models.reference.active():
                logps = sequence_logps(engine, batch)
        else:
            logps = sequence_logps(engine, batch)
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


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(ctx: StageContext[DPOStage], rank: Rank, models: DPOModels, data: StageData) -> dict:
    """Held-out loss (and its DPO and NLL parts), implicit-reward accuracy and margin; greedy exact
    match when asked; with ``eval_reward``, the mean score of replies sampled for the held-out prompts and
    their win rate against the starting policy's."""
    if not data.eval:
        return {}
    stage, engine = ctx.stage, models.engine
    engine.eval()
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64)
    pairs = 0.0
    for weight, indices, batch in held_out_pair_batches(
        data.eval, rank, stage.batch_size, models.tokenizer.pad_token_id, models.packed
    ):
        batch = to_device(batch, engine.device)
        reference_logps = reference_logps_of(models, batch, "eval", indices)
        policy_logps = sequence_logps(engine, batch)
        loss, out, nll = preference_loss(stage, policy_logps, reference_logps, response_lengths(batch))
        policy_chosen, policy_rejected = policy_logps.chunk(2)
        prefers_chosen = (policy_chosen > policy_rejected).sum().item()
        sums += weight * torch.cat([_pair_sums(loss, out, nll), torch.tensor([prefers_chosen], dtype=torch.float64)])
        pairs += weight * len(indices)
    totals = all_reduce_sum([*sums.tolist(), pairs])
    pairs = max(totals.pop(), 1.0)
    # logp_accuracy: the policy itself gives the chosen response the higher log-probability.
    result = {"eval_" + key: value / pairs for key, value in zip([*METRIC_KEYS, "logp_accuracy"], totals)}
    if stage.eval_exact_match:
        result["eval_exact_match"] = exact_match(
            engine.module,
            models.tokenizer,
            data.eval_rows,
            rank,
            max_prompt_length=stage.max_prompt_length or stage.max_length,
            synced_gpus=ctx.job.deepspeed.zero_stage == 3,
        )
    if models.replies is not None:
        result.update(models.replies.evaluate(rank))
    engine.train()
    return result
