"""Log-probabilities of chosen tokens and masked reductions.

Every stage scores tokens with :func:`token_logprobs` / :func:`sequence_logprobs` and reduces
per-token values with the ``masked_*`` helpers, so the numerics live here once.

Shapes are written as ``(batch, seq)`` for per-token tensors and ``(batch, seq, vocab)`` for logits.
A ``mask`` is read as boolean: nonzero marks a position that counts.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Upper bound on the elements of one float32 working chunk (2**26 floats = 256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs; float64 stays float64 (useful for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _row_chunks(seq_len: int, vocab_size: int):
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    for start in range(0, seq_len, rows):
        yield start, min(start + rows, seq_len)


class _TokenLogprobs(torch.autograd.Function):
    """``log_softmax(logits)[label]`` computed chunk by chunk in float32.

    Forward keeps only the per-token log-normaliser (batch, seq) besides the logits themselves;
    backward rebuilds ``softmax`` one chunk at a time. A plain ``logits.float()`` path would instead
    keep a float32 copy of the whole (batch, seq, vocab) tensor alive until backward.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        batch, seq_len, vocab_size = logits.shape
        dtype = _compute_dtype(logits.dtype)
        token_logps = torch.empty(batch, seq_len, dtype=dtype, device=logits.device)
        log_normalisers = torch.empty(batch, seq_len, dtype=dtype, device=logits.device)
        for row in range(batch):
            for start, end in _row_chunks(seq_len, vocab_size):
                chunk = logits[row, start:end].to(dtype)
                chunk_lse = torch.logsumexp(chunk, dim=-1)
                picked = chunk.gather(-1, labels[row, start:end, None]).squeeze(-1)
                token_logps[row, start:end] = picked - chunk_lse
                log_normalisers[row, start:end] = chunk_lse
        ctx.save_for_backward(logits, labels, log_normalisers)
        return token_logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        logits, labels, log_normalisers = ctx.saved_tensors
        batch, seq_len, vocab_size = logits.shape
        dtype = log_normalisers.dtype
        grad_logits = torch.empty_like(logits)
        # d/dlogits of (logits[label] - logsumexp(logits)) = onehot(label) - softmax(logits)
        for row in range(batch):
            for start, end in _row_chunks(seq_len, vocab_size):
                grad_chunk = grad_output[row, start:end].to(dtype).unsqueeze(-1)
                probs = (logits[row, start:end].to(dtype) - log_normalisers[row, start:end, None]).exp_()
                chunk_grad = probs.mul_(-grad_chunk)
                chunk_grad.scatter_add_(-1, labels[row, start:end, None], grad_chunk)
                grad_logits[row, start:end] = chunk_grad
        return grad_logits, None


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under its logits: ``log_softmax(logits)[labels]``.

    Args:
        logits: (batch, seq, vocab), any floating dtype.
        labels: (batch, seq) token ids, already aligned with ``logits`` (no shift here).

    Returns:
        (batch, seq) in float32 (float64 if ``logits`` is float64).

    Computed as ``logits[label] - logsumexp(logits)`` over row chunks, so no full-size float32
    copy of bf16/fp16 logits is made or kept for backward. Labels outside ``[0, vocab)``
    (``-100`` and other ignore indices) are replaced by 0 before the gather: their values are
    meaningless and the caller masks them out.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logprobs expects logits (batch, seq, vocab) and labels (batch, seq); "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    vocab_size = logits.shape[-1]
    labels = labels.long()
    safe_labels = torch.where((labels >= 0) & (labels < vocab_size), labels, torch.zeros_like(labels))
    return _TokenLogprobs.apply(logits, safe_labels)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """Summed log-probability of the masked tokens of each sequence, ``log π(y | x)``.

    ``sum_t mask[t+1] · log softmax(logits[t])[input_ids[t+1]]`` for t in [0, seq-1): the logits at
    position t predict the token at t+1.

    Args:
        logits: (batch, seq, vocab) from the model on ``input_ids``.
        input_ids: (batch, seq).
        loss_mask: (batch, seq), aligned with ``input_ids``: nonzero on the tokens to score
            (typically the response tokens).

    Returns:
        (batch,) float32.

    The shift is done on the labels and mask (shifted left, last position masked out) rather than by
    slicing ``logits[:, :-1]``, which gives the same sum without a sliced copy of the logits'
    gradient in backward.
    """
    if input_ids.shape != logits.shape[:2] or loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"sequence_logprobs expects logits (batch, seq, vocab), input_ids and loss_mask (batch, seq); "
            f"got {tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(loss_mask.shape)}"
        )
    next_tokens = torch.cat([input_ids[:, 1:], input_ids.new_zeros(input_ids.shape[0], 1)], dim=1)
    next_mask = torch.cat(
        [loss_mask[:, 1:].bool(), loss_mask.new_zeros(loss_mask.shape[0], 1, dtype=torch.bool)], dim=1
    )
    return masked_sum(token_logprobs(logits, next_tokens), next_mask, dim=-1)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values · mask)`` over ``dim`` (all elements when None).

    Masked-out positions are dropped with ``where`` rather than multiplied by 0, so a ``-inf`` or
    NaN there cannot leak into the sum or its gradient. ``mask`` broadcasts to ``values``.
    """
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def _masked_count(values: Tensor, mask: Tensor, dim: int | None) -> Tensor:
    counts = mask.bool().expand_as(values)
    return counts.sum() if dim is None else counts.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """``sum(values · mask) / sum(mask)`` over ``dim`` (all elements when None).

    A slice with no unmasked position gives 0 (not NaN): its sum is 0 and the count is clamped to 1.
    """
    count = _masked_count(values, mask, dim).clamp(min=1)
    return masked_sum(values, mask, dim) / count


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked elements of ``values`` (a scalar).

    ``sum(mask · (values - mean)²) / (n - 1)`` with Bessel's correction when ``unbiased`` (the
    default, as in TRL and OpenRLHF PPO whitening), ``/ n`` otherwise; ``n`` is the number of masked
    elements. With ``n <= 1`` the result is 0 rather than NaN.
    """
    mean = masked_mean(values, mask)
    squared = masked_sum((values - mean) ** 2, mask)
    count = _masked_count(values, mask, None)
    denominator = (count - 1) if unbiased else count
    return squared / denominator.clamp(min=1)


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    *,
    mean: Tensor | float | None = None,
    var: Tensor | float | None = None,
) -> Tensor:
    """Normalise ``values`` to unit variance over the masked elements: ``(v - μ) / sqrt(σ² + eps)``.

    ``μ`` and ``σ²`` are :func:`masked_mean` and :func:`masked_var` (unbiased) of ``values`` unless
    given as ``mean`` and ``var``: statistics over more than this tensor, as PPO's advantages take
    over every micro-batch on every rank. With ``shift_mean=False`` the mean is added back, so only
    the scale changes (for rewards, whose sign carries meaning). Positions outside ``mask`` go
    through the same affine map; the caller masks them.
    """
    mean = masked_mean(values, mask) if mean is None else mean
    var = masked_var(values, mask) if var is None else var
    # Given as floats, the square root is taken in double precision before the division.
    whitened = (values - mean) / (var + eps) ** 0.5
    return whitened if shift_mean else whitened + mean
