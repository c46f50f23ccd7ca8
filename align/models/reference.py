"""The reference policy: the stage's starting policy, frozen, without a second copy of the base weights."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel

from align.models.adapters import add_initial_lora_copy

REFERENCE_ADAPTER = "reference"


class Reference:
    """Runs forward passes as the starting policy.

    - Fresh adapter on the base: the reference is the base, reached by disabling the adapter; after PiSSA or
      OLoRA, whose base holds only the residual, the base with a frozen copy of the adapter's starting
      matrices (:func:`align.models.adapters.add_initial_lora_copy`). A fresh prefix- or prompt-tuning
      adapter is not a no-op (its untrained virtual tokens already change every output); its reference is
      still the base without them, as TRL's adapter-disabled reference is: the model the job names, not
      that model behind random or text-initialised virtual tokens. The policy then differs from its
      reference at step 0 (DPO's first loss is not ln 2).
    - Adapter continued from an earlier stage: a frozen copy of that adapter is loaded beside the
      trainable one and switched in for reference passes.
    - Full fine-tuning has no frozen weights to share; use precomputed reference log-probs instead.

    The same view serves the PPO stage's reward model: the critic is trained from the reward
    model's adapter and the reward model is that adapter kept frozen beside it (``adapter_name``).
    """

    def __init__(self, model: torch.nn.Module, start_adapter: Path | None, adapter_name: str = REFERENCE_ADAPTER):
        if not isinstance(model, PeftModel):
            raise ValueError("a live reference needs an adapter; use reference: precomputed with full fine-tuning")
        self.model = model
        self.adapter_name = adapter_name
        if start_adapter is not None:
            model.load_adapter(str(start_adapter), adapter_name=adapter_name, is_trainable=False)
            self.frozen_copy = True
        else:
            self.frozen_copy = add_initial_lora_copy(model, adapter_name)
        if self.frozen_copy:
            model.set_adapter("default")
            _freeze_adapter(model, adapter_name)

    @contextmanager
    def active(self):
        """Inside this block the model computes the reference policy (no gradients)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if self.frozen_copy:
                    self.model.set_adapter(self.adapter_name)
                    try:
                        yield
                    finally:
                        self.model.set_adapter("default")
                        _freeze_adapter(self.model, self.adapter_name)
                else:
                    with self.model.disable_adapter():
                        yield
        finally:
            self.model.train(was_training)


def _freeze_adapter(model: PeftModel, adapter_name: str) -> None:
    # peft's set_adapter marks the adapter it activates as trainable; the reference never is. A LoRA weight
    # is named `...lora_A.<adapter>.weight`, an IA3 vector `...ia3_l.<adapter>`, virtual tokens
    # `prompt_encoder.<adapter>.embedding.weight`.
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name or name.endswith(f".{adapter_name}"):
            param.requires_grad_(False)
