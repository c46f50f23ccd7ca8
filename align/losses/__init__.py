"""Training losses as pure functions of log-probs, rewards and masks."""

from align.losses.dpo import DPOLossType, DPOOutput, chosen_nll, dpo_loss, implicit_reward_accuracy
from align.losses.ppo import (
    GRPOLossOutput,
    PolicyLossOutput,
    ValueLossOutput,
    entropy_from_logits,
    grpo_loss,
    policy_loss,
    value_loss,
)
from align.losses.reward import pairwise_accuracy, pairwise_reward_loss
from align.losses.sft import sft_loss

__all__ = [
    "DPOLossType",
    "DPOOutput",
    "GRPOLossOutput",
    "PolicyLossOutput",
    "ValueLossOutput",
    "chosen_nll",
    "dpo_loss",
    "entropy_from_logits",
    "grpo_loss",
    "implicit_reward_accuracy",
    "pairwise_accuracy",
    "pairwise_reward_loss",
    "policy_loss",
    "sft_loss",
    "value_loss",
]
