"""Reward models and critics: a scalar head on a transformer body, read per token or per sequence.

A reward-model artifact (``kind: reward_model``) is either a whole sequence-classification model
(full fine-tuning) or a peft adapter with its head for the base model. When the reward model was
trained over a policy (``init: policy``), that policy's adapter is merged into the body first; it
travels inside the artifact as ``body/``, so the artifact is complete with the base model alone.

The reward is read where Hugging Face's sequence-classification models read it: at the last token
that is not padding. A critic reads the same head at every position: the value of the state before
each next token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from torch import Tensor

from align.models.load import load_reward_model
from align.spec import QuantizationSpec

BODY_DIR = "body"
"""Folder inside a reward-model adapter artifact holding the policy adapter merged into its body."""


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def merge_policy_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Merge a causal-LM adapter into the body of a sequence-classification model (same base)."""
    config = PeftConfig.from_pretrained(adapter_dir)
    config.task_type = None  # a causal-LM adapter, applied here to the same body under a scalar head
    return PeftModel.from_pretrained(model, adapter_dir, config=config).merge_and_unload()


def load_reward_body(
    base: Path, reward_dir: Path, dtype: torch.dtype, pad_token_id: int, quantization: QuantizationSpec | None
) -> torch.nn.Module:
    """The model a reward-model artifact's adapter sits on: the base with a scalar head and the
    artifact's ``body/`` policy adapter merged in; for a full reward model, the artifact itself."""
    reward_dir = Path(reward_dir)
    if not is_adapter(reward_dir):
        return load_reward_model(reward_dir, dtype, pad_token_id, quantization)
    model = load_reward_model(base, dtype, pad_token_id, quantization)
    if (reward_dir / BODY_DIR).is_dir():
        model = merge_policy_adapter(model, reward_dir / BODY_DIR)
    return model


def load_frozen_reward_model(
    base: Path, reward_dir: Path, dtype: torch.dtype, pad_token_id: int, quantization: QuantizationSpec | None
) -> torch.nn.Module:
    """A reward-model artifact ready to score: frozen, in eval mode."""
    model = load_reward_body(base, reward_dir, dtype, pad_token_id, quantization)
    if is_adapter(reward_dir):
        model = PeftModel.from_pretrained(model, reward_dir, is_trainable=False)
    model.requires_grad_(False)
    return model.eval()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def scalar_head(model: torch.nn.Module) -> torch.nn.Module:
    """The sequence-classification model's head (``score`` or ``classifier``)."""
    inner = _unwrapped(model)
    for name in ("score", "classifier"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return getattr(inner, name)
    raise ValueError(f"{type(inner).__name__} has no `score` or `classifier` head to read a reward from")


def token_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar head at every position, (batch, seq) in float32."""
    inner = _unwrapped(model)
    hidden = getattr(inner, inner.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask)[0]
    return scalar_head(model)(hidden).squeeze(-1).float()


def last_token_index(input_ids: Tensor, pad_token_id: int) -> Tensor:
    """(batch,) index of each row's last non-padding token: where the reward is read."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(dim=-1)


def sequence_scores(scores: Tensor, input_ids: Tensor, pad_token_id: int) -> Tensor:
    """(batch,) rewards: ``scores`` (batch, seq) read at each row's last non-padding token."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return scores[rows, last_token_index(input_ids, pad_token_id)]


class TokenValues(torch.nn.Module):
    """A sequence-classification model whose forward returns its head at every position (a critic)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return token_scores(self.model, input_ids, attention_mask)
