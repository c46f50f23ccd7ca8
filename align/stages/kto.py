"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired rows against the frozen starting policy.

Each row is one completion to a prompt, marked desirable or undesirable (``align.losses.kto_loss``). The
reference point z₀ is the micro-batch's estimate of the KL from the reference, measured on completions paired
with other rows' prompts. Each row's mismatched completion is fixed once, before training (the row before it
in a seeded permutation of the split, ``kl_partners``), as TRL fixes its KL completions when it prepares the
dataset; so a row is laid out like a DPO pair, its own completion in the first slot and the mismatched one in
the second, both after its prompt. That lets KTO use DPO's batches (packed, the prompt encoded once for both
completions), its reference (a frozen copy of a continued adapter, the base for a fresh one, or log-probs
computed once with ``reference: precomputed`` and with full fine-tuning) and its held-out batching.
"""

from __future__ import annotations

import random
from functools import partial

import torch

from align.data.load import DataError
from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput
from align.evaluate import exact_match
from align.evaluate_generations import pair_stage_replies
from align.losses.kto import KTOOutput, kto_kl_estimate, kto_loss, mismatched_completion_index
from align.models.policy import disable_dropout, load_policy
from align.models.reference import Reference
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, KTOStage
from align.stages import artifact
from align.stages.batches import held_out_pair_batches, input_tokens, packs, preference_batch, sequence_logps
from align.stages.context import StageContext, StageResult, start
from align.stages.dpo import DPOModels, precompute_reference, reference_logps_of
from align.stages.loop import after_step, resume, to_device

METRIC_KEYS = ["loss", "kl", "rewards_desirable", "rewards_undesirable", "rewards_accuracy"]
"""What the stage logs per step. ``kl`` is the reference point z₀; ``rewards_desirable`` and
``rewards_undesirable`` are the mean implicit reward ``β · (log π - log π_ref)`` of each kind of row;
``rewards_accuracy`` is the fraction of rows whose log-ratio lies on their label's side of z₀."""
SUM_KEYS = ["loss", "kl", "desirable_rewards", "desirable_rows", "undesirable_rewards", "undesirable_rows",
            "accurate_rows"]
"""Per-micro-batch sums behind ``METRIC_KEYS``, in the order of ``row_sums``."""


def run(ctx: StageContext[KTOStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    tokenizer, model = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    disable_dropout(model)
    reference = Reference(model, ctx.start_policy) if job.adapter.is_peft else None
    data = with_kl_completions(load_stage_data(stage, "unpaired", tokenizer), stage)
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    models = DPOModels(engine, tokenizer, reference, packed=packs(stage, model, ctx.message))
    if stage.reference == "precomputed" or reference is None:
        models.precomputed = precompute_reference(ctx, rank, models, data)
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    first_step = resume(ctx, engine, rank, metrics)["step"]
    models.replies = pair_stage_replies(ctx, rank, engine, tokenizer, data.eval_rows, first_step)
    if first_step == 0 and (held_out := evaluate(ctx, rank, models, data)):
        # The starting policy's numbers on the same held-out rows, for comparison.
        metrics.log({"step": 0, **held_out})
    pad = tokenizer.pad_token_id
    throughput = Throughput()

    engine.train()
    for step in range(first_step, steps):
        micro_batches = micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        step_rows = global_count(sum(len(rows) for rows in micro_batches))
        scale = accumulation_scale(step_rows, stage.gradient_accumulation_steps, rank.world_size)
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
        for rows in micro_batches:
            features = [data.train[i] for i in rows]
            desirable = labels_of(features, engine.device)
            batch = to_device(preference_batch(features, pad, models.packed), engine.device)
            reference_logps = reference_logps_of(models, batch, "train", rows)
            policy_logps = sequence_logps(engine, batch)
            out = unpaired_loss(stage, policy_logps, reference_logps, desirable)
            engine.backward(out.losses.sum() * scale)
            engine.step()
            sums += row_sums(out, desirable, stage.beta)
            throughput.add(input_tokens(batch))
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput, record=partial(step_means, sums),
        )

    final = artifact.final_metrics(metrics.records, [*FINAL_METRICS["kto"], "tokens_per_s"])
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    kind = "adapter" if job.adapter.is_peft else "full"
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind=kind, metrics=final,
                            fingerprints=data.fingerprints)


# --- rows with their mismatched completion ------------------------------------------------------------


def kl_partners(rows: int, seed: int) -> list[int]:
    """``partners[i]``: the row whose completion follows row ``i``'s prompt in its KL sequence.

    The rows are put in a seeded random order and each takes the completion of the row before it
    (``align.losses.kto.mismatched_completion_index``), so every completion is used once, under another
    row's prompt. Rows of one source pair (a preference dataset gives two rows per prompt, next to each
    other) are split up by the shuffle.
    """
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    before = mismatched_completion_index(rows).tolist()
    partners = [0] * rows
    for position, row in enumerate(order):
        partners[row] = order[before[position]]
    return partners


def kto_pairs(rows: list[dict], seed: int, max_length: int) -> list[dict]:
    """Each unpaired row as a pair-shaped feature (:func:`align.data.collate.collate_preference`'s input):
    ``chosen_*`` its prompt and completion, ``rejected_*`` its prompt and its partner's completion (cut to
    ``max_length``), ``prompt_length``, and ``label``."""
    partners = kl_partners(len(rows), seed)
    features = []
    for row, partner in zip(rows, partners):
        prompt = row["prompt_ids"]
        room = max_length - len(prompt)
        other = rows[partner]
        features.append({
            "chosen_input_ids": prompt + row["completion_ids"],
            "chosen_loss_mask": [0] * len(prompt) + row["completion_mask"],
            "rejected_input_ids": prompt + other["completion_ids"][:room],
            "rejected_loss_mask": [0] * len(prompt) + other["completion_mask"][:room],
            "prompt_length": len(prompt),
            "label": row["label"],
        })
    return features


def with_kl_completions(data: StageData, stage: KTOStage) -> StageData:
    """``data`` with its training and held-out rows as :func:`kto_pairs`; too few rows raise ``DataError``."""
    for split, rows in (("data.path", data.train), ("data.eval_path", data.eval)):
        if len(rows) == 1:
            raise DataError(getattr(stage.data, split.removeprefix("data.")) or stage.data.path, None, None,
                            f"{split}: KTO needs at least 2 rows to pair completions with other prompts, got 1",
                            "add rows")
    data.train = kto_pairs(data.train, stage.seed, stage.max_length)
    data.eval = kto_pairs(data.eval, stage.seed, stage.max_length) if data.eval else []
    return data


def labels_of(features: list[dict], device=None) -> torch.Tensor:
    """(rows,) bool: True for a desirable row."""
    return torch.tensor([feature["label"] for feature in features], dtype=torch.bool, device=device)


# --- loss and metrics -------------------------------------------------------------------------------


def unpaired_loss(
    stage: KTOStage, policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor,
    weight: float = 1.0,
) -> KTOOutput:
    """KTO's per-row losses of a micro-batch. Log-probs are (2 * rows,): each row's own completion, then its
    mismatched one. The reference point is the KL estimate of the mismatched completions, averaged over the
    data-parallel ranks (every rank calls this equally often); ``weight`` 0 leaves a rank's estimate out."""
    policy, policy_mismatched = policy_logps.chunk(2)
    reference, reference_mismatched = reference_logps.chunk(2)
    estimate = kto_kl_estimate(policy_mismatched, reference_mismatched).item()
    weighted, weights = all_reduce_sum([weight * estimate, weight])
    return kto_loss(
        policy, reference, desirable, weighted / weights if weights else 0.0, beta=stage.beta,
        desirable_weight=stage.desirable_weight, undesirable_weight=stage.undesirable_weight,
    )


def row_sums(out: KTOOutput, desirable: torch.Tensor, beta: float) -> torch.Tensor:
    """Sums over a micro-batch's rows, in the order of ``SUM_KEYS``."""
    desirable = desirable.to(out.rewards.device)
    rewards = out.rewards.float()
    above = rewards > beta * out.reference_point
    below = rewards < beta * out.reference_point
    rows = len(rewards)
    return torch.tensor(
        [
            out.losses.sum().item(),
            out.reference_point.item() * rows,
            rewards[desirable].sum().item(),
            desirable.sum().item(),
            rewards[~desirable].sum().item(),
            (~desirable).sum().item(),
            torch.where(desirable, above, below).sum().item(),
        ],
        dtype=torch.float64,
    )


def step_means(sums: torch.Tensor, prefix: str = "") -> dict:
    """``METRIC_KEYS`` from the ranks' summed ``row_sums`` (each kind's reward is left out when it had no row)."""
    total = dict(zip(SUM_KEYS, all_reduce_sum(sums.tolist())))
    rows = total["desirable_rows"] + total["undesirable_rows"]
    means = {"loss": total["loss"] / max(rows, 1.0), "kl": total["kl"] / max(rows, 1.0),
             "rewards_accuracy": total["accurate_rows"] / max(rows, 1.0)}
    for kind in ("desirable", "undesirable"):
        if total[f"{kind}_rows"]:
            means[f"rewards_{kind}"] = total[f"{kind}_rewards"] / total[f"{kind}_rows"]
    return {prefix + key: means[key] for key in METRIC_KEYS if key in means}


@torch.no_grad()
def evaluate(ctx: StageContext[KTOStage], rank: Rank, models: DPOModels, data: StageData) -> dict:
    """The step metrics on the held-out rows (``eval_`` before each), each micro-batch with its own reference
    point; greedy exact match on the desirable rows' prompts when asked; with ``eval_reward``, the mean score of
    replies sampled for the held-out prompts and their win rate against the starting policy's."""
    if not data.eval:
        return {}
    stage, engine = ctx.stage, models.engine
    engine.eval()
    sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64)
    for weight, indices, batch in held_out_pair_batches(
        data.eval, rank, stage.batch_size, models.tokenizer.pad_token_id, models.packed
    ):
        batch = to_device(batch, engine.device)
        reference_logps = reference_logps_of(models, batch, "eval", indices)
        desirable = labels_of([data.eval[i] for i in indices], engine.device)
        out = unpaired_loss(stage, sequence_logps(engine, batch), reference_logps, desirable, weight)
        sums += weight * row_sums(out, desirable, stage.beta)
    result = step_means(sums, "eval_")
    if stage.eval_exact_match:
        # An undesirable row's completion is no reference answer, so only desirable rows are asked.
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
