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

import torch

from align.engine.build import build_engine
from align.engine.checkpoint import save_checkpoint
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog
from align.evaluate import exact_match
from align.generation import CachedGenerator, Completion, SamplingParams
from align.losses.ppo import grpo_loss
from align.models.load import resolve_base_model
from align.models.reference import Reference
from align.models.reward import load_frozen_reward_model
from align.ops.advantages import grpo_advantages, kl_k1, rloo_advantages
from align.ops.aggregate import accumulation_scale, global_count
from align.rewards import Scorer
from align.spec import MODEL_REWARD
from align.stages import common
from align.stages.common import StageContext, StageResult

# Sums over the step (all micro-batches and ranks), divided by the count named beside each when logged.
SAMPLE_SUMS = ["reward_sum", "reward_squares", "successes", "response_tokens", "finished", "flat_groups"]
TOKEN_SUMS = ["loss_sum", "kl_sum", "clipped_tokens", "ratio_sum"]


def run(ctx: StageContext) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = common.start(ctx)
    tokenizer, model = common.load_policy(ctx)
    common.disable_dropout(model)
    reference = Reference(model, ctx.start_policy)
    data = common.load_stage_data(ctx, "prompt", tokenizer)
    scorer = reward_scorer(ctx, tokenizer)
    advantages_of = grpo_advantages if stage.type == "grpo" else rloo_advantages
    steps = common.total_steps(stage, len(data.train), rank.world_size)
    engine, _, scheduler = build_engine(model, job, stage, steps, rank, dtype=common.dtype_of(ctx))
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics)
    first_step = common.resume(ctx, engine, rank, metrics)
    if first_step == 0 and (held_out := evaluate(engine, tokenizer, data, ctx, rank)):
        # The starting policy's held-out accuracy, for comparison with the end.
        metrics.log({"step": 0, **held_out})
    generator = CachedGenerator(engine.module, tokenizer, synced=job.deepspeed.zero_stage == 3)
    # Each prompt is encoded once for its whole group (see common.completion_logps); gradient
    # checkpointing keeps no KV cache, so then every completion carries its own copy of the prompt.
    shared_prefix = not job.deepspeed.gradient_checkpointing
    pad = common.pad_id(tokenizer)
    throughput = common.Throughput()

    engine.train()
    for step in range(first_step, steps):
        micro_batches = common.micro_batch_indices(
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
                seed=common.sampling_seed(stage.seed, step, rank.rank, micro),
            )
            completions = generator.generate([p["prompt_input_ids"] for p in prompts], params)
            rewards = scorer.score(
                common.to_device(common.completion_batch(prompts, completions, pad), engine.device),
                [prompts[c.prompt_index] for c in completions], completions,
            ).cpu()
            rollouts.append((common.group_batch(prompts, completions, stage.group_size, pad), rewards))
            sample_sums += _sample_sums(rewards, scorer.successes(rewards), completions, stage.group_size)
        step_tokens = global_count(sum(int(batch["completion_mask"].sum()) for batch, _ in rollouts))
        scale = accumulation_scale(step_tokens, stage.gradient_accumulation_steps, rank.world_size)

        token_sums = torch.zeros(len(TOKEN_SUMS), dtype=torch.float64)
        for batch, rewards in rollouts:
            batch = common.to_device(batch, engine.device)
            with reference.active():
                reference_logps = common.completion_logps(engine, batch, stage.group_size, shared_prefix)
            logps = common.completion_logps(engine, batch, stage.group_size, shared_prefix)
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
        done = step + 1
        if done % stage.log_every == 0 or done == steps:
            samples = global_count(sum(len(rows) for rows in micro_batches)) * stage.group_size
            record = _step_record(all_reduce_sum(sample_sums.tolist()), all_reduce_sum(token_sums.tolist()),
                                  samples, step_tokens, stage.group_size, with_accuracy=scorer.success is not None)
            record.update(step=done, lr=scheduler.get_last_lr()[0], grad_norm=common.grad_norm(engine),
                          tokens_per_s=throughput.read(), samples_per_s=throughput.samples_per_s)
            metrics.log(record)
        if ((stage.eval_every and done % stage.eval_every == 0) or done == steps) and (
            held_out := evaluate(engine, tokenizer, data, ctx, rank)
        ):
            metrics.log({"step": done, **held_out})
        if stage.checkpoint_every and done % stage.checkpoint_every == 0 and done < steps:
            save_checkpoint(engine, ctx.checkpoint_dir, done, rank, {"stage": ctx.name})
            common.checkpoint_saved(ctx, done)

    final = common.final_metrics(
        metrics.records,
        ["loss", "reward_mean", "accuracy", "kl", "response_length", "eval_exact_match", "tokens_per_s", "samples_per_s"],
    )
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    return common.publish(ctx, engine.module, tokenizer, rank, kind="adapter", metrics=final,
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


def _step_record(sample_sums: list[float], token_sums: list[float], samples: float, tokens: float,
                 group_size: int, with_accuracy: bool) -> dict:
    """The step's means; ``accuracy`` (the fraction of right completions) only when the reward says
    which scores are right."""
    s = dict(zip(SAMPLE_SUMS, sample_sums))
    t = dict(zip(TOKEN_SUMS, token_sums))
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


def reward_scorer(ctx: StageContext, tokenizer) -> Scorer:
    """The named reward function, or the reward model loaded frozen on its own."""
    stage, job = ctx.stage, ctx.job
    if stage.reward != MODEL_REWARD:
        return Scorer.named(tokenizer.pad_token_id, stage.reward)
    model = load_frozen_reward_model(
        resolve_base_model(job.base_model), ctx.reward_model, common.dtype_of(ctx), tokenizer.pad_token_id,
        job.quantization,
    )
    return Scorer(tokenizer.pad_token_id, model=model)


@torch.no_grad()
def evaluate(engine, tokenizer, data: common.StageData, ctx: StageContext, rank: Rank) -> dict:
    """Held-out greedy exact-match accuracy (rows with a reference answer)."""
    stage = ctx.stage
    if not data.eval_rows or not stage.eval_exact_match:
        return {}
    accuracy = exact_match(
        engine.module,
        tokenizer,
        data.eval_rows,
        rank,
        max_prompt_length=stage.max_length - stage.max_new_tokens,
        max_new_tokens=stage.max_new_tokens,
        synced_gpus=ctx.job.deepspeed.zero_stage == 3,
    )
    engine.train()
    return {"eval_exact_match": accuracy}
