"""Reward functions the online RL stages may name in a job spec.

A spec names a reward from a fixed allow-list (``align.spec.RewardName``), never code to import or
run: this dict maps each name to its function. A reward function takes the prompt text (the last
user turn of the prompt) and the decoded completion and returns a float.
"""

from __future__ import annotations

from typing import Any, Callable, get_args

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
