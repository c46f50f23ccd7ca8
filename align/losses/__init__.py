"""Training losses as pure functions of log-probs, rewards and masks."""

from align.losses.dpo import DPOLossType, DPOOutput, chosen_nll, dpo_loss, implicit_reward_accuracy
from align.losses.kto import KTOOutput, kto_kl_estimate, kto_loss, mismatched_completion_index
from align.losses.orpo import ORPOOutput, orpo_loss
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
from align.losses.simpo import SimPOOutput, simpo_loss

__all__ = [
    "DPOLossType",
    "DPOOutput",
    "GRPOLossOutput",
    "KTOOutput",
    "ORPOOutput",
    "PolicyLossOutput",
    "SimPOOutput",
    "ValueLossOutput",
    "chosen_nll",
    "dpo_loss",
    "entropy_from_logits",
    "grpo_loss",
    "implicit_reward_accuracy",
    "kto_kl_estimate",
    "kto_loss",
    "mismatched_completion_index",
    "orpo_loss",
    "pairwise_accuracy",
    "pairwise_reward_loss",
    "policy_loss",
    "sft_loss",
    "simpo_loss",
    "value_loss",
]
