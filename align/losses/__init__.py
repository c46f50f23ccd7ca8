"""Training losses as pure functions of log-probs, rewards and masks."""

from align.losses.dpo import DPOLossType, DPOOutput, chosen_nll, dpo_loss, implicit_reward_accuracy
from align.losses.reward import pairwise_accuracy, pairwise_reward_loss
from align.losses.sft import sft_loss

__all__ = [
    "DPOLossType",
    "DPOOutput",
    "chosen_nll",
    "dpo_loss",
    "implicit_reward_accuracy",
    "pairwise_accuracy",
    "pairwise_reward_loss",
    "sft_loss",
]
