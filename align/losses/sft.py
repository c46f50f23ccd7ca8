"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch
from torch import Tensor

from align.ops.logprobs import masked_sum


def sft_loss(token_logps: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed negative log-likelihood of the masked tokens.

    ``loss = -sum_{b,t} mask[b,t] · log π(y[b,t] | y[b,<t])``

    Args:
        token_logps: (batch, seq) log-probs of the target tokens, already shifted so position t
            scores the token the model predicts there (see ``align.ops.token_logprobs``).
        loss_mask: (batch, seq) aligned with ``token_logps``; nonzero on tokens to learn.

    Returns:
        ``(nll_sum, token_count)``: the differentiable scalar sum and the detached int64 number of
        masked tokens. The sum is not normalised here; the stage multiplies it by
        ``align.ops.accumulation_scale`` so every token of the global step weighs the same.
    """
    nll_sum = -masked_sum(token_logps, loss_mask)
    token_count = loss_mask.detach().bool().sum().to(torch.int64)
    return nll_sum, token_count
