"""What scores the completions of the online RL stages: a reward model or a named reward function.

A spec names a reward function from a fixed allow-list (``align.spec.RewardName``), never code to
import or run: ``REWARDS`` maps each name to its function. A reward function takes the prompt text
(the last user turn of the prompt) and the decoded completion and returns a float. ``SUCCESS`` says,
for each name, which of its scores mean the completion is right (the stages' ``accuracy``); a reward
model's scores have no such reading.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

import torch

from align import task
from align.spec import RewardName

RewardFunction = Callable[[str, str], float]
SuccessTest = Callable[[float], bool]

REWARDS: dict[str, RewardFunction] = {
    "exact_answer": task.exact_answer_reward,
}
SUCCESS: dict[str, SuccessTest] = {
    "exact_answer": lambda score: score == 1.0,  # 1.0 for the right answer, 0.0 for any other
}

if not set(REWARDS) == set(SUCCESS) == set(get_args(RewardName)):  # the spec's allow-list and these tables agree
    raise RuntimeError(
        f"align.spec.RewardName {get_args(RewardName)}, REWARDS {sorted(REWARDS)} and SUCCESS {sorted(SUCCESS)} differ"
    )


def reward_function(name: str) -> RewardFunction:
    """The reward function called ``name``; ``ValueError`` naming the known rewards otherwise."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def reward_success(name: str) -> SuccessTest:
    """Whether a score of the reward function ``name`` means a right completion."""
    reward_function(name)  # the same error for an unknown name
    return SUCCESS[name]


def prompt_text(prompt: Any) -> str:
    """The text a reward sees as the prompt: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [message["content"] for message in prompt if message["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


class Scorer:
    """One score per completion, from a reward function, a frozen reward model, or a reward model
    kept frozen beside the PPO critic (``view``, read through the critic's engine once attached).
    ``success`` comes with a reward function: which of its scores mean a right completion."""

    def __init__(self, pad: int, *, function: RewardFunction | None = None, success: SuccessTest | None = None,
                 model=None, view=None):
        self.pad, self.function, self.success, self.model, self.view = pad, function, success, model, view
        self.engine = None

    @classmethod
    def named(cls, pad: int, name: str) -> Scorer:
        """The scorer of the reward function ``name``, with its success test."""
        return cls(pad, function=reward_function(name), success=reward_success(name))

    def attach(self, critic_engine) -> None:
        self.engine = critic_engine

    @torch.no_grad()
    def score(self, batch: dict, prompts: list[dict], completions: list) -> torch.Tensor:
        """(completions,) float32 scores; ``batch`` holds prompt + completion rows (``input_ids``,
        ``attention_mask``), ``prompts[i]`` the prompt row of ``completions[i]``."""
        from align.models.reward import sequence_scores, token_scores

        ids, attention = batch["input_ids"], batch["attention_mask"]
        if self.function is not None:
            values = [self.function(prompt_text(p["prompt"]), c.text) for p, c in zip(prompts, completions)]
            return torch.tensor(values, dtype=torch.float32, device=ids.device)
        if self.view is not None:
            with self.view.active():
                return sequence_scores(self.engine(ids, attention), ids, self.pad)
        return sequence_scores(token_scores(self.model, ids, attention), ids, self.pad)

    def successes(self, scores: torch.Tensor) -> torch.Tensor | None:
        """(completions,) 1.0 where a score means a right completion, else 0.0; ``None`` when the scores
        have no such reading (a reward model's)."""
        if self.success is None:
            return None
        return torch.tensor([float(self.success(float(score))) for score in scores], dtype=torch.float64)
