"""Base models, tokenizers, adapters, published artifacts, and the reference policy."""

from align.models.adapters import apply_adapter, trainable_state_dict
from align.models.load import (
    load_artifact,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_base_model,
)

__all__ = [
    "apply_adapter",
    "load_artifact",
    "load_causal_lm",
    "load_reward_model",
    "load_tokenizer",
    "resolve_base_model",
    "trainable_state_dict",
]
