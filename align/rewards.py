"""What scores the completions of the online RL stages: a reward model or a named reward function.

A spec names a reward function from a fixed allow-list (``align.spec.RewardName``), never code to
import or run: ``REWARDS`` maps each name to its function. A reward function takes the prompt text
(the last user turn of the prompt) and the decoded completion and returns a float.
"""

from __future__ import annotations

from typing import Any, Callable, get_args

import torch

from align import task
from align.spec import RewardName

RewardFunction = Callable[[str, str], float]

REWARDS: dict[str, RewardFunction] = {
    "exact_answer": task.exact_answer_reward,
}

if set(REWARDS) != set(get_args(RewardName)):  # the spec's allow-list and this table name the same rewards
    raise RuntimeError(f"align.spec.RewardName {get_args(RewardName)} and REWARDS {sorted(REWARDS)} differ")


def reward_function(name: str) -> RewardFunction:
    """The reward function called ``name``; ``ValueError`` naming the known rewards otherwise."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def prompt_text(prompt: Any) -> str:
    """The text a reward sees as the prompt: the string itself, or the last user turn of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [message["content"] for message in prompt if message["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


class Scorer:
    """One score per completion, from a reward function, a frozen reward model, or a reward model
    kept frozen beside the PPO critic (``view``, read through the critic's engine once attached)."""

    def __init__(self, pad: int, *, function: RewardFunction | None = None, model=None, view=None):
        self.pad, self.function, self.model, self.view = pad, function, model, view
        self.engine = None

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
