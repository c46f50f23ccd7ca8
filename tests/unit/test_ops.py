"""Tests for align.ops: token log-probs, masked reductions, loss aggregation."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import align.ops.logprobs as logprobs_module
from align.losses.sft import sft_loss
from align.ops import (
    accumulation_scale,
    global_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)

LN3 = math.log(3.0)


def reference_token_logprobs(logits, labels):
    """Straightforward float32 log_softmax + gather, for parity checks."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


# --- token_logprobs -------------------------------------------------------------------------


def test_token_logprobs_hand_worked():
    """logits [0, ln 3]: softmax = [1/(1+3), 3/(1+3)] = [1/4, 3/4].

    Label 0 → ln(1/4) = -1.386294; label 1 → ln(3/4) = -0.287682.
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    labels = torch.tensor([[0, 1]])
    out = token_logprobs(logits, labels)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[math.log(1 / 4), math.log(3 / 4)]]))


def test_token_logprobs_ignored_labels_do_not_crash():
    """Labels -100 and ≥ vocab are read as 0: logits [0, ln 3] give ln(1/4) there, finite."""
    logits = torch.tensor([[[0.0, LN3], [0.0, LN3], [0.0, LN3]]])
    labels = torch.tensor([[-100, 7, 1]])
    out = token_logprobs(logits, labels)
    torch.testing.assert_close(out, torch.tensor([[math.log(1 / 4), math.log(1 / 4), math.log(3 / 4)]]))


def test_token_logprobs_bf16_is_float32_and_close_to_reference():
    """bf16 input: float32 output, within 1e-2 of the float32 logits' result (bf16 rounding of the
    inputs is the only error) and equal to float32 maths on the rounded values."""
    torch.manual_seed(0)
    logits32 = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    logits16 = logits32.bfloat16()
    out = token_logprobs(logits16, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_token_logprobs(logits32, labels), atol=1e-2, rtol=0)
    torch.testing.assert_close(out, reference_token_logprobs(logits16.float(), labels))


def test_token_logprobs_float32_output_and_grad_match_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 9, requires_grad=True)
    labels = torch.randint(0, 9, (3, 4))
    weights = torch.randn(3, 4)
    (token_logprobs(logits, labels) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    (reference_token_logprobs(logits, labels) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad)


def test_token_logprobs_bf16_grad_dtype_and_value():
    torch.manual_seed(2)
    base = torch.randn(2, 3, 7)
    labels = torch.randint(0, 7, (2, 3))
    logits16 = base.bfloat16().requires_grad_()
    token_logprobs(logits16, labels).sum().backward()
    assert logits16.grad.dtype == torch.bfloat16
    logits32 = base.bfloat16().float().requires_grad_()
    reference_token_logprobs(logits32, labels).sum().backward()
    torch.testing.assert_close(logits16.grad.float(), logits32.grad, atol=1e-2, rtol=0)


def test_token_logprobs_gradcheck_float64():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 4, -100], [2, 2, 1]])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, labels), (logits,))


def test_token_logprobs_chunked_matches_single_chunk(monkeypatch):
    """A chunk budget of 7 elements with vocab 3 gives 2 rows per chunk: several chunks per sequence."""
    monkeypatch.setattr(logprobs_module, "_CHUNK_ELEMENTS", 7)
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 3, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5))
    token_logprobs(logits, labels).sum().backward()
    chunked_grad = logits.grad.clone()
    logits.grad = None
    expected = reference_token_logprobs(logits, labels)
    expected.sum().backward()
    torch.testing.assert_close(token_logprobs(logits, labels), expected)
    torch.testing.assert_close(chunked_grad, logits.grad)


def test_token_logprobs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        token_logprobs(torch.zeros(1, 3, 4), torch.zeros(1, 2, dtype=torch.long))


# --- sequence_logprobs ----------------------------------------------------------------------


def test_sequence_logprobs_hand_worked():
    """Row 0: ids [0, 1, 0], vocab 2; logits[0] = [0, ln 3], logits[1] = [0, 0].

    Position 1 (id 1) is scored by logits[0]: ln(3/4). Position 2 (id 0) by logits[1]: ln(1/2).
    mask [0, 1, 1] → ln(3/4) + ln(1/2) = ln(3/8) = -0.980829. logits[2] predicts nothing and is unused
    (set to 100 to show it). Row 1: same logits, mask [0, 0, 1] → ln(1/2). Row 2: mask all 0 → 0.
    """
    row_logits = torch.tensor([[0.0, LN3], [0.0, 0.0], [100.0, -100.0]])
    logits = row_logits.expand(3, 3, 2).clone()
    input_ids = torch.tensor([[0, 1, 0]] * 3)
    loss_mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]])
    out = sequence_logprobs(logits, input_ids, loss_mask)
    assert out.shape == (3,) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([math.log(3 / 8), math.log(1 / 2), 0.0]))


def test_sequence_logprobs_matches_sliced_reference_with_grad():
    torch.manual_seed(5)
    logits = torch.randn(3, 6, 8, requires_grad=True)
    input_ids = torch.randint(0, 8, (3, 6))
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    out = sequence_logprobs(logits, input_ids, loss_mask)
    out.sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    per_token = reference_token_logprobs(logits[:, :-1], input_ids[:, 1:])
    expected = (per_token * loss_mask[:, 1:]).sum(-1)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(ours, logits.grad)


# --- masked reductions ----------------------------------------------------------------------


def test_masked_sum_and_mean_hand_worked():
    """values [[1,2,3],[4,5,6]], mask [[1,1,0],[0,0,0]].

    sum = 1 + 2 = 3; mean over all = 3 / 2 = 1.5; per row: [3/2, 0/max(0,1)] = [1.5, 0] (no NaN).
    """
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_sum(values, mask).item() == 3.0
    torch.testing.assert_close(masked_sum(values, mask, dim=-1), torch.tensor([3.0, 0.0]))
    assert masked_mean(values, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(masked_mean(values, mask, dim=0), torch.tensor([1.0, 2.0, 0.0]))


def test_masked_mean_fully_masked_is_zero():
    out = masked_mean(torch.tensor([[1.0, 2.0]]), torch.tensor([[False, False]]))
    assert out.item() == 0.0


def test_masked_sum_ignores_inf_at_masked_positions():
    """values [1, -inf], mask [1, 0]: sum 1, gradient [1, 0] (no NaN from -inf · 0)."""
    values = torch.tensor([1.0, -math.inf], requires_grad=True)
    out = masked_sum(values, torch.tensor([True, False]))
    out.backward()
    assert out.item() == 1.0
    torch.testing.assert_close(values.grad, torch.tensor([1.0, 0.0]))


def test_masked_var_hand_worked():
    """values [1,2,3,4,100], mask [1,1,1,1,0]: mean (1+2+3+4)/4 = 2.5.

    Squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5 → unbiased 5/3, biased 5/4.
    One masked element: deviation 0 over max(0, 1) → 0.
    """
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    torch.testing.assert_close(masked_var(values, mask), torch.tensor(5 / 3))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), torch.tensor(5 / 4))
    assert masked_var(values, torch.tensor([0, 0, 1, 0, 0])).item() == 0.0


def test_masked_whiten_hand_worked():
    """Same data: μ = 2.5, σ² = 5/3, σ = 1.290994.

    v = 1 → (1 - 2.5)/1.290994 = -1.161895; v = 4 → +1.161895. shift_mean=False adds 2.5 back:
    1.338105 and 3.661895. Masked whitened values have mean 0 and unbiased variance 1.
    """
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened[[0, 3]], torch.tensor([-1.161895, 1.161895]))
    torch.testing.assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_var(whitened, mask), torch.tensor(1.0))
    unshifted = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(unshifted[[0, 3]], torch.tensor([1.338105, 3.661895]))


def test_masked_whiten_with_statistics_of_a_larger_batch():
    """Two of the four values above, whitened with the statistics of all four (μ = 2.5, σ² = 5/3, as PPO
    whitens each micro-batch with those of every micro-batch): -1.161895 and 1.161895 as before."""
    part = masked_whiten(torch.tensor([1.0, 4.0]), torch.tensor([1, 1]), mean=2.5, var=5 / 3)
    torch.testing.assert_close(part, torch.tensor([-1.161895, 1.161895]))


# --- aggregation ----------------------------------------------------------------------------


def test_accumulation_scale_hand_worked():
    """20 tokens in the step, 4 micro-batches, 2 ranks: 4 · 2 / 20 = 0.4. No tokens: 0."""
    assert accumulation_scale(20, 4, 2) == pytest.approx(0.4)
    assert accumulation_scale(8.0, 1, 1) == pytest.approx(0.125)
    assert accumulation_scale(0, 4, 2) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"global_count": 4, "gradient_accumulation_steps": 0, "world_size": 1}, "gradient_accumulation"),
        ({"global_count": 4, "gradient_accumulation_steps": 1, "world_size": 0}, "world_size"),
        ({"global_count": -1, "gradient_accumulation_steps": 1, "world_size": 1}, "global_count"),
    ],
)
def test_accumulation_scale_rejects_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        accumulation_scale(**kwargs)


# Micro-batches of 2 hold 3, 11, 7 and 7 tokens: unequal, so per-micro-batch means are biased.
LENGTHS = [1, 2, 6, 5, 3, 4, 6, 1]


def _tiny_batch():
    torch.manual_seed(6)
    features = torch.randn(8, 6, 4)
    labels = torch.randint(0, 5, (8, 6))
    loss_mask = (torch.arange(6)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return features, labels, loss_mask


def _simulated_step_grad(micro_batch_size, gradient_accumulation_steps, world_size, naive=False):
    """Gradient of a tiny linear model after one global step under a mimicked DeepSpeed engine.

    Rank r takes rows [r·gas·mbs, (r+1)·gas·mbs); each micro-batch loss is divided by gas before
    backward (the engine's scaling) and rank gradients are averaged (the all-reduce).
    """
    features, labels, loss_mask = _tiny_batch()
    torch.manual_seed(7)
    model = torch.nn.Linear(4, 5)
    step_count = global_count(loss_mask.sum())
    scale = accumulation_scale(step_count, gradient_accumulation_steps, world_size)
    rank_grads = []
    rows_per_rank = micro_batch_size * gradient_accumulation_steps
    for rank in range(world_size):
        model.zero_grad()
        for micro in range(gradient_accumulation_steps):
            start = rank * rows_per_rank + micro * micro_batch_size
            rows = slice(start, start + micro_batch_size)
            token_logps = token_logprobs(model(features[rows]), labels[rows])
            nll_sum, token_count = sft_loss(token_logps, loss_mask[rows])
            loss = nll_sum / token_count if naive else nll_sum * scale
            (loss / gradient_accumulation_steps).backward()
        rank_grads.append(model.weight.grad.clone())
    return torch.stack(rank_grads).mean(0)


def _full_batch_mean_grad():
    features, labels, loss_mask = _tiny_batch()
    torch.manual_seed(7)
    model = torch.nn.Linear(4, 5)
    nll_sum, token_count = sft_loss(token_logprobs(model(features), labels), loss_mask)
    (nll_sum / token_count).backward()
    return model.weight.grad


@pytest.mark.parametrize(
    ("micro_batch_size", "gradient_accumulation_steps", "world_size"),
    [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (4, 1, 2)],
)
def test_accumulation_scale_gives_split_invariant_gradient(
    micro_batch_size, gradient_accumulation_steps, world_size
):
    """Any split of the 8 sequences (28 tokens) gives the gradient of (sum of token NLLs) / 28."""
    grad = _simulated_step_grad(micro_batch_size, gradient_accumulation_steps, world_size)
    torch.testing.assert_close(grad, _full_batch_mean_grad(), atol=1e-6, rtol=0)


def test_naive_micro_batch_mean_depends_on_split():
    """Per-micro-batch means weigh a token of the 3-token micro-batch by 1/3, one of the 11-token
    micro-batch by 1/11, instead of 1/28 each: 8x1 and 2x4 give different gradients."""
    whole = _simulated_step_grad(8, 1, 1, naive=True)
    split = _simulated_step_grad(2, 4, 1, naive=True)
    assert not torch.allclose(whole, split, atol=1e-6, rtol=0)


def test_global_count_in_a_world_of_one_is_identity():
    # Stages run earlier in this process may have left a process group of one rank behind.
    assert not dist.is_initialized() or dist.get_world_size() == 1
    assert global_count(5) == 5.0
    assert global_count(torch.tensor(7)) == 7.0
    assert global_count(torch.tensor([True, False, True]).sum()) == 2.0


def _global_count_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results[rank] = global_count(torch.tensor(rank + 3))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_count_sums_over_ranks():
    """Two gloo ranks holding 3 and 4 both get 3 + 4 = 7."""
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        results = manager.dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_global_count_worker, args=(2, init_file, results), nprocs=2, join=True)
        assert dict(results) == {0: 7.0, 1: 7.0}
