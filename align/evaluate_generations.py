"""Held-out generations, scored: what the policy's sampled replies to the held-out prompts are worth under the
stage's scorer (a reward model or a reward function, :class:`align.rewards.Scorer`), and how often they beat
the replies of the policy the stage started from (its parent).

The parent's replies are sampled and scored at the stage's first evaluation, before its first step, with the
sampling seeds every later evaluation uses, so at step 0 the policy's replies are the parent's and the win
rate is exactly 1/2. Their scores are kept in ``parent_scores.pt`` beside the checkpoints: a resumed stage
compares with the parent's replies instead of sampling the policy it has trained since.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from align.data import tokenize
from align.engine.dist import Rank, all_reduce_sum, broadcast_from_main
from align.evaluate import rank_share
from align.generation import CachedGenerator, SamplingParams
from align.rewards import Scorer
from align.stages.rollout import completion_batch, sampling_seed

if TYPE_CHECKING:
    from align.stages.context import StageContext

PARENT_SCORES = "parent_scores.pt"
"""The parent's scores, (prompts, samples), in the stage's work folder."""
REPLIES_PER_CALL = 64
"""Replies sampled per generation call (prompts times samples), as many as :func:`align.evaluate.exact_match`
answers at once: each decoding step is one forward of the whole batch, so few wide calls beat many narrow ones."""


def prompt_wins(policy_scores: torch.Tensor, parent_scores: torch.Tensor) -> torch.Tensor:
    """Each prompt's wins over the parent, (prompts,): of every pair of one policy reply and one parent reply
    to the prompt, the fraction where the policy's reply scores higher, a tie counting 1/2.

    Scores are (prompts, samples): row ``i`` of both holds the scores of the replies to prompt ``i``; the two
    may have different sample counts.
    """
    if policy_scores.shape[0] != parent_scores.shape[0]:
        raise ValueError(f"scores of {policy_scores.shape[0]} prompts against the parent's of {parent_scores.shape[0]}")
    difference = policy_scores.double()[:, :, None] - parent_scores.double()[:, None, :]
    return ((difference > 0).double() + 0.5 * (difference == 0).double()).mean(dim=(1, 2))


def win_rate(policy_scores: torch.Tensor, parent_scores: torch.Tensor) -> float:
    """The fraction of prompts where the policy's reply scores above the parent's, ties counting 1/2: the mean
    of :func:`prompt_wins` over prompts (with several replies per prompt, each prompt counts its share of won
    pairs)."""
    return prompt_wins(policy_scores, parent_scores).mean().item()


@dataclass(frozen=True)
class ReplySampling:
    """How the held-out replies are sampled."""

    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    samples: int = 1
    """Replies per prompt."""
    seed: int = 0
    """The stage seed; each batch of each rank samples from its own stream derived from it."""
    batch_size: int = REPLIES_PER_CALL
    """Prompts per generation call."""


@torch.no_grad()
def sample_scores(
    generator: CachedGenerator, scorer: Scorer, prompts: list[dict], rank: Rank, sampling: ReplySampling,
    device: torch.device,
) -> torch.Tensor:
    """(prompts, samples) float64 scores of replies sampled for every prompt (``prompt_input_ids``, ``prompt``),
    the same table on every rank. Each rank samples its share, in batches, padded so that every rank runs the
    same number of batches (under ZeRO-3 every forward is collective); the shares are summed over ranks.
    The same prompts, weights, ranks and ``sampling`` give the same replies."""
    table = torch.zeros(len(prompts), sampling.samples, dtype=torch.float64)
    mine, counted = rank_share(list(range(len(prompts))), rank)
    pad = generator.pad_token_id
    for batch_index, begin in enumerate(range(0, len(mine), sampling.batch_size)):
        indices = mine[begin : begin + sampling.batch_size]
        chunk = [prompts[i] for i in indices]
        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            num_samples=sampling.samples, seed=sampling_seed(sampling.seed, -1, rank.rank, batch_index),
        )
        completions = generator.generate([p["prompt_input_ids"] for p in chunk], params)
        batch = {key: value.to(device) for key, value in completion_batch(chunk, completions, pad).items()}
        scores = scorer.score(batch, [chunk[c.prompt_index] for c in completions], completions)
        scores = scores.double().cpu().reshape(len(chunk), sampling.samples)
        for index, row, keep in zip(indices, scores, counted[begin : begin + sampling.batch_size]):
            if keep:
                table[index] = row
    return torch.tensor(all_reduce_sum(table.flatten().tolist()), dtype=torch.float64).reshape(table.shape)


class ParentScores:
    """The parent's scores of its replies to the held-out prompts, for the win rate.

    A stage that starts at step 0 takes the scores of its first evaluation (its starting policy's) as the
    parent's and writes them to ``path`` (whole or not at all, on the main rank); a resumed stage reads them
    back there (the main rank reads and sends them to every rank, so all agree even without a shared disk).
    """

    def __init__(self, path: Path, rank: Rank, first_step: int, message=None):
        self.path, self.rank = Path(path), rank
        self.scores: torch.Tensor | None = None
        self._take_next = first_step == 0
        if not self._take_next:
            self.scores = broadcast_from_main(_read(self.path) if rank.is_main else None)
            if self.scores is None and rank.is_main and message is not None:
                message(f"no scores of the starting policy's held-out replies in {self.path}; eval_win_rate is "
                        "not measured in this attempt", "warning")

    def win_rate(self, scores: torch.Tensor) -> dict:
        """``{"eval_win_rate": ...}`` of ``scores`` against the parent's (the first call of a stage started at
        step 0 records ``scores`` as the parent's); ``{}`` when the parent's are unknown or do not match."""
        if self._take_next:
            self._take_next = False
            self.scores = scores.clone()
            if self.rank.is_main:
                unfinished = self.path.with_suffix(".partial")
                torch.save({"scores": self.scores}, unfinished)
                unfinished.replace(self.path)
        if self.scores is None or self.scores.shape[0] != scores.shape[0]:
            return {}
        return {"eval_win_rate": win_rate(scores, self.scores)}


def _read(path: Path) -> torch.Tensor | None:
    if not path.exists():
        return None
    saved = torch.load(path)
    return saved.get("scores") if isinstance(saved, dict) else None


class HeldOutReplies:
    """Samples replies to the held-out prompts from the policy, scores them, and compares with the parent's."""

    def __init__(self, generator: CachedGenerator, scorer: Scorer, prompts: list[dict], sampling: ReplySampling,
                 parent: ParentScores, device: torch.device):
        self.generator, self.scorer, self.prompts = generator, scorer, prompts
        self.sampling, self.parent, self.device = sampling, parent, device

    def evaluate(self, rank: Rank) -> dict:
        """``eval_reward_mean`` (over every reply) and ``eval_win_rate`` (against the parent's replies)."""
        if not self.prompts:
            return {}
        scores = sample_scores(self.generator, self.scorer, self.prompts, rank, self.sampling, self.device)
        return {"eval_reward_mean": scores.mean().item(), **self.parent.win_rate(scores)}


def load_scorer(ctx: StageContext, tokenizer, reward: str, device: torch.device) -> Scorer:
    """The scorer ``reward`` names: a reward function, or (``model``) the stage's reward model
    (``ctx.reward_model``), loaded frozen on its own on ``device``."""
    from align.models.load import resolve_base_model
    from align.models.reward import load_frozen_reward_model
    from align.spec import MODEL_REWARD

    pad, job = tokenizer.pad_token_id, ctx.job
    if reward != MODEL_REWARD:
        return Scorer.named(pad, reward)
    base = resolve_base_model(job.base_model, artifact_root=ctx.artifact_root)
    model = load_frozen_reward_model(base, ctx.reward_model, ctx.dtype, pad, job.quantization)
    if job.quantization is None:  # quantised weights were placed on the device as they loaded
        model = model.to(device)
    return Scorer(pad, model=model)


def pair_stage_replies(ctx: StageContext, rank: Rank, engine, tokenizer, eval_rows: list[dict],
                       first_step: int) -> HeldOutReplies | None:
    """The held-out replies of a dpo, orpo, simpo or kto stage with ``eval_reward`` (None without): the prompts
    of its held-out rows, cut from the left to leave room for ``max_new_tokens``, sampled from the policy
    ``engine`` trains."""
    stage = ctx.stage
    if stage.eval_reward is None:
        return None
    room = stage.max_length - stage.max_new_tokens
    max_prompt_length = min(stage.max_prompt_length or room, room)
    prompts = [tokenize.tokenize_prompt(row, row["_format"], tokenizer, max_prompt_length) for row in eval_rows]
    generator = CachedGenerator(engine.module, tokenizer, synced=ctx.job.deepspeed.zero_stage == 3)
    sampling = ReplySampling(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature,
                             samples=stage.eval_samples, seed=stage.seed,
                             batch_size=max(1, REPLIES_PER_CALL // stage.eval_samples))
    parent = ParentScores(ctx.work_dir / PARENT_SCORES, rank, first_step, ctx.message)
    scorer = load_scorer(ctx, tokenizer, stage.eval_reward, engine.device)
    return HeldOutReplies(generator, scorer, prompts, sampling, parent, engine.device)


def online_stage_replies(ctx: StageContext, rank: Rank, generator: CachedGenerator, scorer: Scorer,
                         prompts: list[dict], first_step: int, device: torch.device) -> HeldOutReplies:
    """The held-out replies of a grpo or rloo stage: one per held-out prompt, sampled as in training
    (``max_new_tokens``, ``temperature``, ``top_p``) and scored by the stage's reward."""
    stage = ctx.stage
    sampling = ReplySampling(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
                             seed=stage.seed)
    parent = ParentScores(ctx.work_dir / PARENT_SCORES, rank, first_step, ctx.message)
    return HeldOutReplies(generator, scorer, prompts, sampling, parent, device)
