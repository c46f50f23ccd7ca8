"""ORPO and SimPO: preference optimisation from the policy's own log-probs, with no reference model.

Both score a pair by the policy's log-probs of the chosen and rejected responses averaged over each
response's tokens. ORPO (Hong et al. 2024, ``align.losses.orpo_loss``) adds to the chosen response's
NLL a penalty on the log odds ratio of chosen to rejected; SimPO (Meng et al. 2024,
``align.losses.simpo_loss``) pushes the reward margin ``β · (mean log-prob chosen - rejected)`` above
``γ``, optionally beside the chosen NLL (CPO-SimPO). Nothing but the trained policy is held and a step
is one forward and backward over its pairs (packed, each prompt encoded once, by default). Dropout is
off, as in the DPO stage and TRL's trainers, so a pair scores the same in training and evaluation.
"""

from __future__ import annotations

from functools import partial

import torch

from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput, means_over_ranks
from align.evaluate import exact_match
from align.evaluate_generations import pair_stage_replies
from align.losses.dpo import chosen_nll, implicit_reward_accuracy
from align.losses.orpo import orpo_loss
from align.losses.simpo import simpo_loss
from align.models.policy import disable_dropout, load_policy
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, ORPOStage, SimPOStage
from align.stages import artifact
from align.stages.batches import (
    held_out_pair_batches,
    input_tokens,
    packs,
    preference_batch,
    response_lengths,
    sequence_logps,
)
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device

REWARD_KEYS = ["rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"]
# ORPO: loss = nll_loss + beta * odds_ratio_loss. SimPO: loss = simpo_loss + sft_weight * nll_loss.
METRIC_KEYS = {
    "orpo": ["loss", "nll_loss", "odds_ratio_loss", "log_odds_ratio", *REWARD_KEYS],
    "simpo": ["loss", "simpo_loss", "nll_loss", *REWARD_KEYS],
}
"""What each stage logs per step (means over the step's pairs), in the order of ``pair_loss``'s sums."""


def run(ctx: StageContext[ORPOStage | SimPOStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    keys = METRIC_KEYS[stage.type]
    rank = start(ctx)
    tokenizer, model = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    disable_dropout(model)
    data = load_stage_data(stage, "preference", tokenizer)
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    models = StageModels(engine, tokenizer, packed=packs(stage, model, ctx.message))
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
        sums = torch.zeros(len(keys), dtype=torch.float64)
        for rows in micro_batches:
            batch = to_device(preference_batch([data.train[i] for i in rows], pad, models.packed), engine.device)
            loss, pair_sums = pair_loss(stage, sequence_logps(engine, batch), response_lengths(batch))
            engine.backward(loss * scale)
            engine.step()
            sums += pair_sums
            throughput.add(input_tokens(batch))
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput, record=partial(means_over_ranks, keys, sums, step_pairs),
        )

    final = artifact.final_metrics(metrics.records, [*FINAL_METRICS[stage.type], "tokens_per_s"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    kind = "adapter" if job.adapter.is_peft else "full"
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind=kind, metrics=final,
                            fingerprints=data.fingerprints)


def pair_loss(
    stage: ORPOStage | SimPOStage, policy_logps: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's summed loss and its per-pair sums in the order of ``METRIC_KEYS[stage.type]``.
    ``policy_logps`` and ``lengths`` are (2 * pairs,), chosen first: summed log-probs and scored token counts."""
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    chosen, rejected = policy_logps.chunk(2)
    nll = chosen_nll(chosen, chosen_lengths)
    if stage.type == "orpo":
        out = orpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=stage.beta)
        loss = out.losses.sum()
        terms = [loss, out.nll.sum(), out.odds_ratio_loss.sum(), out.log_odds_ratio.sum()]
    else:
        out = simpo_loss(chosen, rejected, chosen_lengths, rejected_lengths, beta=stage.beta, gamma=stage.gamma,
                         label_smoothing=stage.label_smoothing)
        loss = out.losses.sum()
        if stage.sft_weight:
            loss = loss + stage.sft_weight * nll.sum()
        terms = [loss, out.losses.sum(), nll.sum()]
    rewards_chosen, rewards_rejected = out.chosen_rewards, out.rejected_rewards
    terms += [rewards_chosen.sum(), rewards_rejected.sum(), (rewards_chosen - rewards_rejected).sum(),
              implicit_reward_accuracy(rewards_chosen, rewards_rejected).sum()]
    return loss, torch.tensor([term.item() for term in terms], dtype=torch.float64)


@torch.no_grad()
def evaluate(ctx: StageContext[ORPOStage | SimPOStage], rank: Rank, models: StageModels, data: StageData) -> dict:
    """The step metrics on the held-out pairs (``eval_`` before each), how often the policy gives the chosen
    response the higher summed log-prob (``eval_logp_accuracy``), greedy exact match when asked, and with
    ``eval_reward`` the mean score of replies sampled for the held-out prompts and their win rate against the
    starting policy's."""
    if not data.eval:
        return {}
    stage, engine = ctx.stage, models.engine
    keys = METRIC_KEYS[stage.type]
    engine.eval()
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    pairs = 0.0
    for weight, indices, batch in held_out_pair_batches(
        data.eval, rank, stage.batch_size, models.tokenizer.pad_token_id, models.packed
    ):
        batch = to_device(batch, engine.device)
        policy_logps = sequence_logps(engine, batch)
        _, pair_sums = pair_loss(stage, policy_logps, response_lengths(batch))
        chosen, rejected = policy_logps.chunk(2)
        prefers_chosen = torch.tensor([(chosen > rejected).sum().item()], dtype=torch.float64)
        sums += weight * torch.cat([pair_sums, prefers_chosen])
        pairs += weight * len(indices)
    totals = all_reduce_sum([*sums.tolist(), pairs])
    pairs = max(totals.pop(), 1.0)
    result = {"eval_" + key: value / pairs for key, value in zip([*keys, "logp_accuracy"], totals)}
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
