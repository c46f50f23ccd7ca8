"""Critic-free online RL: GRPO (Shao et al. 2024, DeepSeekMath) and RLOO (Ahmadian et al. 2024).

Each optimizer step: take prompts → sample ``group_size`` completions of each from the current
policy → score them (reward model or named reward function) → per-token log-probs of the
completions under the reference (no grad) and the policy (with grad), each prompt encoded once for
its group → advantages relative to the group (``grpo``: whitened within the group; ``rloo``: minus
the mean of the other samples), from the rewards less ``kl_coef`` · the completion's summed k1 KL
when ``kl_penalty`` is ``reward`` → clipped surrogate, plus ``kl_coef`` · the per-token k3 KL when
``kl_penalty`` is ``loss`` → backward → step.

The reference is the starting policy: a frozen copy of the adapter an earlier stage left, or the
base with the adapter disabled. There is one optimisation pass per batch of samples, so the
sampling policy is the policy being trained and the ratio is 1 (``old_logps`` is the detached
``logps``); the clip only matters once several passes are made. Dropout is off so that at the
first step the KL to the reference is 0 and the ratio exactly 1.
"""

from __future__ import annotations

from functools import partial

import torch

from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput
from align.evaluate import exact_match
from align.evaluate_generations import load_scorer, online_stage_replies
from align.generation import CachedGenerator, Completion, SamplingParams
from align.losses.ppo import grpo_loss
from align.models.policy import disable_dropout, load_policy
from align.models.reference import Reference
from align.ops.advantages import grpo_advantages, kl_k1, rloo_advantages
from align.ops.aggregate import accumulation_scale, global_count
from align.spec import FINAL_METRICS, GRPOStage
from align.stages import artifact
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device
from align.stages.rollout import completion_batch, completion_logps, group_batch, sampling_seed

# Sums over the step (all micro-batches and ranks), divided by the count named beside each when logged.
SAMPLE_SUMS = ["reward_sum", "reward_squares", "successes", "response_tokens", "finished", "flat_groups"]
TOKEN_SUMS = ["loss_sum", "kl_sum", "clipped_tokens", "ratio_sum"]


def run(ctx: StageContext[GRPOStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    tokenizer, model = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    disable_dropout(model)
    reference = Reference(model, ctx.start_policy)
    data = load_stage_data(stage, "prompt", tokenizer)
    advantages_of = grpo_advantages if stage.type == "grpo" else rloo_advantages
    steps = total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=ctx.dtype)
    scorer = load_scorer(ctx, tokenizer, stage.reward, engine.device)
    models = StageModels(engine, tokenizer)
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    first_step = resume(ctx, engine, rank, metrics)["step"]
    generator = CachedGenerator(engine.module, tokenizer, synced=job.deepspeed.zero_stage == 3)
    models.replies = online_stage_replies(ctx, rank, generator, scorer, data.eval, first_step, engine.device)
    if first_step == 0 and (held_out := evaluate(ctx, rank, models, data)):
        # The starting policy's held-out reward and accuracy, for comparison with the end.
        metrics.log({"step": 0, **held_out})
    # Each prompt is encoded once for its whole group (see align.stages.rollout.completion_logps); gradient
    # checkpointing keeps no KV cache, so then every completion carries its own copy of the prompt.
    shared_prefix = not job.deepspeed.gradient_checkpointing
    pad = tokenizer.pad_token_id
    throughput = Throughput(samples=True)

    engine.train()
    for step in range(first_step, steps):
        micro_batches = micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        # Rollout: sample and score every micro-batch first, so the step's token count is known.
        rollouts = []
        sample_sums = torch.zeros(len(SAMPLE_SUMS), dtype=torch.float64)
        for micro, rows in enumerate(micro_batches):
            prompts = [data.train[i] for i in rows]
            params = SamplingParams(
                max_new_tokens=stage.max_new_tokens,
                temperature=stage.temperature,
                top_p=stage.top_p,
                num_samples=stage.group_size,
                seed=sampling_seed(stage.seed, step, rank.rank, micro),
            )
            completions = generator.generate([p["prompt_input_ids"] for p in prompts], params)
            rewards = scorer.score(
                to_device(completion_batch(prompts, completions, pad), engine.device),
                [prompts[c.prompt_index] for c in completions], completions,
            ).cpu()
            rollouts.append((group_batch(prompts, completions, stage.group_size, pad), rewards))
            sample_sums += _sample_sums(rewards, scorer.successes(rewards), completions, stage.group_size)
        step_tokens = global_count(sum(int(batch["completion_mask"].sum()) for batch, _ in rollouts))
        scale = accumulation_scale(step_tokens, stage.gradient_accumulation_steps, rank.world_size)

        token_sums = torch.zeros(len(TOKEN_SUMS), dtype=torch.float64)
        for batch, rewards in rollouts:
            batch = to_device(batch, engine.device)
            with reference.active():
                reference_logps = completion_logps(engine, batch, stage.group_size, shared_prefix)
            logps = completion_logps(engine, batch, stage.group_size, shared_prefix)
            if stage.kl_penalty == "reward":
                # Each completion's reward pays for its KL to the reference (summed k1, no gradient).
                completion_kl = (kl_k1(logps.detach(), reference_logps) * batch["completion_mask"]).sum(dim=1)
                rewards = rewards - stage.kl_coef * completion_kl.cpu()
            advantages = advantages_of(rewards, stage.group_size)
            out = grpo_loss(
                logps,
                logps.detach(),  # one pass per batch: the sampling policy is this policy
                reference_logps,
                advantages.to(engine.device),
                batch["completion_mask"],
                clip_eps=stage.clip_eps,
                kl_coef=stage.kl_coef if stage.kl_penalty == "loss" else 0.0,
            )
            engine.backward(out.loss_sum * scale)
            engine.step()
            token_sums += torch.tensor(
                [out.loss_sum.item(), out.kl_sum.item(), out.clipped_tokens.item(), out.ratio_sum.item()],
                dtype=torch.float64,
            )
            throughput.add(int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()),
                           len(batch["completion_ids"]))
        step_samples = global_count(sum(len(rows) for rows in micro_batches)) * stage.group_size
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput,
            record=partial(_step_record, sample_sums, token_sums, step_samples, step_tokens, stage.group_size,
                           with_accuracy=scorer.success is not None),
        )

    final = artifact.final_metrics(
        metrics.records,
        [*FINAL_METRICS[stage.type], "tokens_per_s", "samples_per_s"],
    )
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    return artifact.publish(ctx, engine.module, tokenizer, rank, kind="adapter", metrics=final,
                            fingerprints=data.fingerprints)


def _sample_sums(
    rewards: torch.Tensor, successes: torch.Tensor | None, completions: list[Completion], group_size: int
) -> torch.Tensor:
    groups = rewards.reshape(-1, group_size)
    return torch.tensor(
        [
            rewards.sum().item(),
            (rewards.double() ** 2).sum().item(),
            successes.sum().item() if successes is not None else 0.0,
            sum(len(c.token_ids) for c in completions),
            sum(c.finished for c in completions),
            # Groups whose samples all score the same have advantage 0 everywhere: no learning signal.
            (groups.max(dim=1).values == groups.min(dim=1).values).sum().item(),
        ],
        dtype=torch.float64,
    )


def _step_record(sample_sums: torch.Tensor, token_sums: torch.Tensor, samples: float, tokens: float,
                 group_size: int, with_accuracy: bool) -> dict:
    """The step's sums over every rank as means; ``accuracy`` (the fraction of right completions) only
    when the reward says which scores are right."""
    s = dict(zip(SAMPLE_SUMS, all_reduce_sum(sample_sums.tolist())))
    t = dict(zip(TOKEN_SUMS, all_reduce_sum(token_sums.tolist())))
    reward_mean = s["reward_sum"] / samples
    variance = max(s["reward_squares"] / samples - reward_mean**2, 0.0)
    tokens = max(tokens, 1.0)
    accuracy = {"accuracy": s["successes"] / samples} if with_accuracy else {}
    return {
        "loss": t["loss_sum"] / tokens,
        "reward_mean": reward_mean,
        "reward_std": variance**0.5,
        **accuracy,
        "flat_group_fraction": s["flat_groups"] * group_size / samples,
        "response_length": s["response_tokens"] / samples,
        "finished_fraction": s["finished"] / samples,
        "kl": t["kl_sum"] / tokens,
        "clip_fraction": t["clipped_tokens"] / tokens,
        "ratio": t["ratio_sum"] / tokens,
    }


@torch.no_grad()
def evaluate(ctx: StageContext[GRPOStage], rank: Rank, models: StageModels, data: StageData) -> dict:
    """Held-out prompts: the mean reward of a reply sampled for each and the win rate against the starting
    policy's replies (sampled with the same seeds at step 0); greedy exact-match accuracy (rows with a
    reference answer) when asked."""
    stage, engine = ctx.stage, models.engine
    result = models.replies.evaluate(rank) if models.replies is not None else {}
    if data.eval_rows and stage.eval_exact_match:
        result["eval_exact_match"] = exact_match(
            engine.module,
            models.tokenizer,
            data.eval_rows,
            rank,
            max_prompt_length=stage.max_length - stage.max_new_tokens,
            max_new_tokens=stage.max_new_tokens,
            synced_gpus=ctx.job.deepspeed.zero_stage == 3,
        )
    engine.train()
    return result
