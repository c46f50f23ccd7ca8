"""PPO with a critic against a reward model: the RL step of InstructGPT (Ouyang et al. 2022), with
the KL-penalised reward of Ziegler et al. 2019.

Each step, on every worker:

1. rollout: sample one completion of each prompt from the current policy;
2. score: the reward model reads prompt + completion at its last token (minus
   ``missing_eos_penalty`` for completions cut before EOS), or a named reward function;
3. per-token log-probs of the completion under the policy (these are ``π_old``) and the frozen
   reference, and the critic's value of every state;
4. reward: ``-β · KL_t`` on every token and the score on the last (``token_rewards``);
5. GAE advantages and returns; advantages whitened over the whole batch of every worker;
6. ``ppo_epochs`` passes over the batch, each one optimizer step of the policy (clipped surrogate,
   optional entropy bonus) and one of the critic (clipped value loss);
7. β adapts towards ``kl_target`` from the batch's KL, if set.

Models: the policy continues the starting policy's adapter and the reference is that adapter kept
frozen beside it (one copy of the base). With ``critic_init: reward_model`` the critic trains from
the reward model's adapter and head, and the reward model is the same adapter kept frozen beside it
(a second copy of the base, shared by critic and reward model). With ``critic_init: policy`` the
critic is the starting policy with a zero value head, and the reward model is loaded on its own.
Dropout is off everywhere so that at the first step the policy/reference KL is 0 and the ratio 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from align.data.order import micro_batch_indices, total_steps
from align.data.stage_data import StageData, load_stage_data
from align.engine.build import build_engine
from align.engine.dist import Rank, all_reduce_sum
from align.engine.metrics import MetricsLog, Throughput
from align.evaluate import exact_match
from align.evaluate_generations import PARENT_SCORES, ParentScores
from align.generation import CachedGenerator, SamplingParams
from align.losses.ppo import entropy_from_logits, policy_loss, value_loss
from align.models.adapters import apply_adapter
from align.models.load import load_reward_model, resolve_base_model
from align.models.policy import disable_dropout, load_policy
from align.models.reference import Reference
from align.models.reward import (
    TokenValues,
    is_adapter,
    load_frozen_reward_model,
    load_reward_body,
    merge_policy_adapter,
    scalar_head,
)
from align.ops.advantages import AdaptiveKLController, FixedKLController, gae, kl_estimate, token_rewards
from align.ops.aggregate import accumulation_scale, global_count
from align.ops.logprobs import masked_sum, masked_whiten, token_logprobs
from align.rewards import Scorer, prompt_text
from align.spec import FINAL_METRICS, MODEL_REWARD, PPOStage
from align.stages import artifact
from align.stages.context import StageContext, StageModels, StageResult, start
from align.stages.loop import after_step, resume, to_device
from align.stages.rollout import completion_batch, sampling_seed

REWARD_ADAPTER = "reward"
# Sums over the step's samples (all micro-batches and ranks), logged divided by the sample count.
SAMPLE_SUMS = ["score_sum", "score_squares", "kl_sum", "response_tokens", "finished"]
# Sums over the tokens of every pass, logged divided by the step's token count times the passes.
TOKEN_SUMS = ["policy_loss", "value_loss", "clipped_tokens", "value_clipped_tokens", "approx_kl", "ratio"]


@dataclass
class Rollout:
    """One micro-batch of samples with everything the PPO passes need, all per response token."""

    batch: dict
    old_logps: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    samples: list[dict]


@dataclass
class PPOModels(StageModels):
    """The policy's engine (``engine``) and what its evaluation also reads."""

    reference: Reference
    scorer: Scorer
    generator: CachedGenerator
    parent_scores: ParentScores
    """The starting policy's scores of its held-out samples, for ``eval_win_rate``."""


def run(ctx: StageContext[PPOStage]) -> StageResult:
    stage, job = ctx.stage, ctx.job
    rank = start(ctx)
    tokenizer, policy = load_policy(job, ctx.start_policy, ctx.dtype, ctx.message, ctx.artifact_root)
    disable_dropout(policy)
    reference = Reference(policy, ctx.start_policy)
    critic, scorer = load_critic(ctx, tokenizer)
    data = load_stage_data(stage, "prompt", tokenizer)
    steps = total_steps(stage, len(data.train), rank.world_size)
    dtype, ppo_steps = ctx.dtype, steps * stage.ppo_epochs
    policy_engine, _, scheduler = build_engine(policy, job, stage, ppo_steps, rank, dtype=dtype)
    critic_engine, _, _ = build_engine(critic, job, stage, ppo_steps, rank, dtype=dtype, lr=stage.critic_lr)
    scorer.attach(critic_engine)
    metrics = MetricsLog(ctx.work_dir / "metrics.jsonl", rank.is_main, ctx.on_metrics, ctx.tracker)
    resumed = resume(ctx, policy_engine, rank, metrics, others={"critic": critic_engine})
    first_step = resumed["step"]
    kl_control = (
        AdaptiveKLController(resumed.get("kl_coef", stage.kl_coef), stage.kl_target, stage.kl_horizon)
        if stage.kl_target is not None
        else FixedKLController(stage.kl_coef)
    )
    generator = CachedGenerator(policy_engine.module, tokenizer, synced=job.deepspeed.zero_stage == 3)
    parent_scores = ParentScores(ctx.work_dir / PARENT_SCORES, rank, first_step, ctx.message)
    models = PPOModels(policy_engine, tokenizer, reference, scorer, generator, parent_scores)
    pad = tokenizer.pad_token_id
    if first_step == 0 and (held_out := evaluate(ctx, rank, models, data)):
        metrics.log({"step": 0, **held_out})  # the starting policy, for comparison with the end
    throughput = Throughput(samples=True)

    for step in range(first_step, steps):
        micro_batches = micro_batch_indices(
            len(data.train), step, stage.batch_size, stage.gradient_accumulation_steps, rank, stage.seed
        )
        # 1-5: sample, score and evaluate every micro-batch before any update.
        rollouts, sample_sums = [], torch.zeros(len(SAMPLE_SUMS), dtype=torch.float64)
        for micro, rows in enumerate(micro_batches):
            prompts = [data.train[i] for i in rows]
            params = SamplingParams(
                max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
                seed=sampling_seed(stage.seed, step, rank.rank, micro),
            )
            completions = generator.generate([p["prompt_input_ids"] for p in prompts], params)
            batch = to_device(completion_batch(prompts, completions, pad), policy_engine.device)
            mask = batch["loss_mask"][:, 1:]
            with torch.no_grad():
                old_logps = sequence_logps(policy_engine, batch)
                with reference.active():
                    reference_logps = sequence_logps(policy_engine, batch)
                values = critic_engine(batch["input_ids"], batch["attention_mask"])[:, :-1]
                scores = scorer.score(batch, [prompts[c.prompt_index] for c in completions], completions)
            if stage.missing_eos_penalty is not None:
                unfinished = torch.tensor([not c.finished for c in completions], device=scores.device)
                scores = scores - stage.missing_eos_penalty * unfinished
            kl = kl_estimate(old_logps, reference_logps, stage.kl_estimator) * mask
            rewards = token_rewards(scores, kl, mask, kl_control.coef)
            advantages, returns = gae(rewards, values, mask, stage.gamma, stage.lam)
            shown = [
                {"prompt": prompt_text(prompts[c.prompt_index]["prompt"]), "completion": c.text, "score": float(s)}
                for c, s in zip(completions, scores)
            ]
            rollouts.append(Rollout(batch, old_logps, values, advantages, returns, shown))
            sample_sums += torch.tensor(
                [scores.sum().item(), (scores.double() ** 2).sum().item(), masked_sum(kl, mask).item(),
                 mask.sum().item(), sum(c.finished for c in completions)],
                dtype=torch.float64,
            )
        if stage.whiten_advantages:
            whiten_advantages(rollouts)
        step_tokens = global_count(sum(int(r.batch["loss_mask"][:, 1:].sum()) for r in rollouts))
        scale = accumulation_scale(step_tokens, stage.gradient_accumulation_steps, rank.world_size)

        # 6: ppo_epochs passes; each ends in one optimizer step of the policy and one of the critic.
        token_sums = torch.zeros(len(TOKEN_SUMS), dtype=torch.float64)
        entropy_sum = first_pass_ratio_sum = 0.0
        policy_engine.train()
        critic_engine.train()
        for ppo_epoch in range(stage.ppo_epochs):
            for rollout in rollouts:
                batch, mask = rollout.batch, rollout.batch["loss_mask"][:, 1:]
                logits = policy_engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logps = token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])
                out = policy_loss(logps, rollout.old_logps, rollout.advantages, mask, stage.clip_eps)
                loss = out.loss_sum
                if stage.entropy_coef > 0 or ppo_epoch == 0:
                    with torch.set_grad_enabled(stage.entropy_coef > 0):
                        entropy, _ = entropy_from_logits(logits[:, :-1], mask)
                    loss = loss - stage.entropy_coef * entropy if stage.entropy_coef > 0 else loss
                    if ppo_epoch == 0:
                        entropy_sum += entropy.item()
                        first_pass_ratio_sum += out.ratio_sum.item()
                policy_engine.backward(loss * scale)
                policy_engine.step()

                values = critic_engine(batch["input_ids"], batch["attention_mask"])[:, :-1]
                value_out = value_loss(values, rollout.values, rollout.returns, mask, stage.value_clip_eps)
                critic_engine.backward(value_out.loss_sum * scale)
                critic_engine.step()
                token_sums += torch.tensor(
                    [out.loss_sum.item(), value_out.loss_sum.item(), out.clipped_tokens.item(),
                     value_out.clipped_tokens.item(), out.approx_kl_sum.item(), out.ratio_sum.item()],
                    dtype=torch.float64,
                )
                throughput.add(int(batch["attention_mask"].sum()), len(batch["input_ids"]) if ppo_epoch == 0 else 0)

        # 7: adapt β to the KL of this batch (per completion, summed over its tokens).
        step_samples = global_count(sum(len(rows) for rows in micro_batches))
        step_sums = all_reduce_sum(sample_sums.tolist())
        kl_coef = kl_control.coef  # the β this step's rewards used
        kl_control.update(step_sums[SAMPLE_SUMS.index("kl_sum")] / step_samples, int(step_samples))
        passes = [*token_sums.tolist(), entropy_sum, first_pass_ratio_sum]
        after_step(
            ctx, rank, step + 1, steps, models=models, data=data, evaluate=evaluate, metrics=metrics,
            scheduler=scheduler, throughput=throughput,
            record=partial(_step_record, step_sums, passes, step_samples, step_tokens, stage.ppo_epochs, kl_coef),
            samples=rollouts[0].samples[:4],
            checkpoint_state={"kl_coef": kl_control.coef}, checkpoint_others={"critic": critic_engine},
        )

    final = artifact.final_metrics(
        metrics.records,
        [*FINAL_METRICS["ppo"], "tokens_per_s", "samples_per_s"],
    )
    final["steps"] = steps
    final["rows_dropped"] = data.dropped
    return artifact.publish(ctx, policy_engine.module, tokenizer, rank, kind="adapter", metrics=final,
                            fingerprints=data.fingerprints)


def sequence_logps(engine, batch: dict) -> torch.Tensor:
    """Per-token log-probs of each sequence's own next tokens, (batch, seq - 1)."""
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_logprobs(logits[:, :-1], batch["input_ids"][:, 1:])


def whiten_advantages(rollouts: list[Rollout]) -> None:
    """Advantages to mean 0, variance 1 over the response tokens of every micro-batch on every rank:
    :func:`align.ops.masked_whiten` with the mean and unbiased variance of all of them; 0 on padding."""
    local = [0.0, 0.0, 0.0]
    for r in rollouts:
        mask = r.batch["loss_mask"][:, 1:].bool()
        a = r.advantages[mask].double()
        local = [local[0] + a.numel(), local[1] + a.sum().item(), local[2] + (a**2).sum().item()]
    count, total, squares = all_reduce_sum(local)
    if count < 2:
        return
    mean = total / count
    variance = max((squares - count * mean**2) / (count - 1), 0.0)
    for r in rollouts:
        mask = r.batch["loss_mask"][:, 1:].bool()
        whitened = masked_whiten(r.advantages, mask, mean=mean, var=variance)
        r.advantages = torch.where(mask, whitened, torch.zeros_like(whitened))


def _step_record(
    sample_sums: list[float], passes: list[float], samples: float, tokens: float, epochs: int, kl_coef: float
) -> dict:
    """The step's means: ``sample_sums`` are summed over ranks already, ``passes`` (``TOKEN_SUMS``, then
    the first pass's entropy and ratio sums) are summed over ranks here; ``kl_coef`` is the β the step's
    rewards used."""
    passes = all_reduce_sum(passes)
    s = dict(zip(SAMPLE_SUMS, sample_sums))
    t = dict(zip(TOKEN_SUMS, passes[: len(TOKEN_SUMS)]))
    entropy_sum, first_pass_ratio_sum = passes[len(TOKEN_SUMS):]
    tokens = max(tokens, 1.0)
    pass_tokens = tokens * epochs
    reward_mean = s["score_sum"] / samples
    return {
        "reward_mean": reward_mean,
        "reward_std": max(s["score_squares"] / samples - reward_mean**2, 0.0) ** 0.5,
        "kl": s["kl_sum"] / samples,
        "response_length": s["response_tokens"] / samples,
        "finished_fraction": s["finished"] / samples,
        "policy_loss": t["policy_loss"] / pass_tokens,
        "value_loss": t["value_loss"] / pass_tokens,
        "clip_fraction": t["clipped_tokens"] / pass_tokens,
        "value_clip_fraction": t["value_clipped_tokens"] / pass_tokens,
        "approx_kl": t["approx_kl"] / pass_tokens,
        "ratio": t["ratio"] / pass_tokens,
        "first_pass_ratio": first_pass_ratio_sum / tokens,
        "entropy": entropy_sum / tokens,
        "kl_coef": kl_coef,
    }


# --- critic and reward ----------------------------------------------------------------------------


def load_critic(ctx: StageContext[PPOStage], tokenizer) -> tuple[TokenValues, Scorer]:
    """The trainable critic (per-token values) and the scorer, as ``critic_init`` and ``reward`` ask."""
    job, stage = ctx.job, ctx.stage
    base = resolve_base_model(job.base_model, artifact_root=ctx.artifact_root)
    dtype, pad, quantization = ctx.dtype, tokenizer.pad_token_id, job.quantization
    adapter_options = {
        "task_type": "SEQ_CLS", "quantized": quantization is not None,
        "gradient_checkpointing": job.deepspeed.gradient_checkpointing,
    }
    if stage.critic_init == "reward_model":
        # Critic and reward model share one body: the critic trains from the reward model's adapter
        # (a fresh adapter over a fully trained reward model) and the reward model stays frozen beside it.
        reward_adapter = ctx.reward_model if is_adapter(ctx.reward_model) else None
        body = load_reward_body(base, ctx.reward_model, dtype, pad, quantization)
        critic = apply_adapter(body, job.adapter, init_from=reward_adapter, **adapter_options)
        scorer = Scorer(pad, view=Reference(critic, reward_adapter, adapter_name=REWARD_ADAPTER))
    else:
        body = load_reward_model(base, dtype, pad, quantization)
        for param in scalar_head(body).parameters():
            torch.nn.init.zeros_(param)  # values start at 0
        if ctx.start_policy is not None:
            body = merge_policy_adapter(body, ctx.start_policy)
        critic = apply_adapter(body, job.adapter, **adapter_options)
        if stage.reward == MODEL_REWARD:
            scorer = Scorer(pad, model=load_frozen_reward_model(base, ctx.reward_model, dtype, pad, quantization))
        else:
            scorer = Scorer.named(pad, stage.reward)
    disable_dropout(critic)
    return TokenValues(critic), scorer


# --- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(ctx: StageContext[PPOStage], rank: Rank, models: PPOModels, data: StageData) -> dict:
    """Held-out prompts, ``eval_samples`` sampled completions of each: the mean reward, its standard
    deviation over completions and over prompts (of each prompt's mean reward), the win rate against the
    starting policy's completions (sampled with the same seeds at step 0), the KL to the reference per
    completion, and greedy exact match when the rows have answers."""
    stage, policy_engine, pad = ctx.stage, models.engine, models.tokenizer.pad_token_id
    if not data.eval:
        return {}
    shard = data.eval[rank.rank :: rank.world_size]
    # completions, score, score², KL, prompts, prompt mean, prompt mean²
    sums = torch.zeros(7, dtype=torch.float64)
    # Every prompt's scores, this rank's rows filled: shard[j] is held-out prompt rank + j * world_size.
    prompt_scores = torch.zeros(len(data.eval), stage.eval_samples, dtype=torch.float64)
    batches = -(-len(data.eval) // (stage.batch_size * rank.world_size))
    for b in range(batches):
        prompts = shard[b * stage.batch_size : (b + 1) * stage.batch_size]
        # A rank out of prompts still takes part (under ZeRO-3 every forward is collective); it counts nothing.
        weight = 1.0 if prompts else 0.0
        prompts = prompts or data.eval[:1]
        params = SamplingParams(
            max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
            num_samples=stage.eval_samples, seed=sampling_seed(stage.seed, -1, rank.rank, b),
        )
        completions = models.generator.generate([p["prompt_input_ids"] for p in prompts], params)
        batch = to_device(completion_batch(prompts, completions, pad), policy_engine.device)
        mask = batch["loss_mask"][:, 1:]
        scores = models.scorer.score(batch, [prompts[c.prompt_index] for c in completions], completions).double()
        logps = sequence_logps(policy_engine, batch)
        with models.reference.active():
            reference_logps = sequence_logps(policy_engine, batch)
        kl = masked_sum(kl_estimate(logps, reference_logps, "k1"), mask)
        by_prompt = scores.cpu().reshape(len(prompts), stage.eval_samples)
        prompt_means = by_prompt.mean(dim=1)
        if weight:
            first = rank.rank + b * stage.batch_size * rank.world_size
            prompt_scores[first : first + len(prompts) * rank.world_size : rank.world_size] = by_prompt
        sums += weight * torch.tensor([len(completions), scores.sum().item(), (scores**2).sum().item(), kl.item(),
                                       len(prompts), prompt_means.sum().item(), (prompt_means**2).sum().item()],
                                      dtype=torch.float64)
    count, total, squares, kl_total, prompt_count, prompt_total, prompt_squares = all_reduce_sum(sums.tolist())
    prompt_scores = torch.tensor(all_reduce_sum(prompt_scores.flatten().tolist())).reshape(prompt_scores.shape)
    mean = total / count
    result = {
        "eval_reward_mean": mean,
        "eval_reward_std": max(squares / count - mean**2, 0.0) ** 0.5,
        "eval_prompt_reward_std": max(prompt_squares / prompt_count - (prompt_total / prompt_count) ** 2, 0.0) ** 0.5,
        "eval_kl": kl_total / count,
        **models.parent_scores.win_rate(prompt_scores),
    }
    if stage.eval_exact_match and data.eval_rows:
        result["eval_exact_match"] = exact_match(
            policy_engine.module, models.tokenizer, data.eval_rows, rank,
            max_prompt_length=stage.max_length - stage.max_new_tokens, max_new_tokens=stage.max_new_tokens,
            synced_gpus=models.generator.synced,
        )
    policy_engine.train()
    return result
