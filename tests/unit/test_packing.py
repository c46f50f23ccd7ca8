"""Padding-free batches (align.ops.packing) and attention over them (align.models.packed_attention): the
layouts worked out by hand, and the same log-probs and gradients as right-padded batches on a Llama with
grouped-query attention, bare and under LoRA."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from align.data.collate import collate_preference, collate_sft
from align.models.packed_attention import IMPLEMENTATION, packed_token_logprobs, use_packed_attention
from align.ops.logprobs import sequence_logprobs, token_logprobs
from align.ops.packing import Block, pack_preference, pack_sft, scored_counts, sequence_sums
from align.stages.batches import packs, preference_batch, response_lengths, scored_nll, scored_tokens, sft_batch

# --- layouts --------------------------------------------------------------------------------------


def test_sft_rows_pack_end_to_end_with_positions_restarting():
    """[5 6 7] (loss on 6, 7) and [8 9] (loss on 9) → one row [5 6 7 8 9], positions 0 1 2 0 1.

    Position t's logits predict token t+1 of the same sequence: 5→6 and 6→7 for the first, 8→9 for the
    second; nothing predicts 8 from 7 (the first sequence's last position scores nothing).
    """
    packed = pack_sft([{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8, 9], "loss_mask": [0, 1]}])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.blocks == (Block(0, 3, ((0, 3),)), Block(3, 5, ((3, 5),)))
    assert all(block.self_only for block in packed.blocks)
    assert packed.score_positions.tolist() == [0, 1, 3]
    assert packed.score_labels.tolist() == [6, 7, 9]
    assert packed.score_rows.tolist() == [0, 0, 1]
    assert (packed.rows, packed.tokens) == (2, 5)


def test_a_pair_shares_its_prompt_and_the_last_prompt_position_predicts_both_replies():
    """Prompt [1 2]; chosen reply [3 4]; rejected reply [5].

    Packed: [1 2 3 4 | 5] with positions 0 1 2 3 | 2 (the rejected reply continues from the prompt).
    Blocks: prompt+chosen causal over itself; the rejected reply attends to the prompt (0..2) and itself.
    Scored: chosen 3 from position 1 and 4 from position 2; rejected 5 from position 1 again.
    Tokens as the two sequences count them: 4 + 3 = 7, of which 5 are packed.
    """
    pair = {"chosen_input_ids": [1, 2, 3, 4], "chosen_loss_mask": [0, 0, 1, 1],
            "rejected_input_ids": [1, 2, 5], "rejected_loss_mask": [0, 0, 1], "prompt_length": 2}
    packed = pack_preference([pair])
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.blocks == (Block(0, 4, ((0, 4),)), Block(4, 5, ((0, 2), (4, 5))))
    assert not packed.blocks[1].self_only
    assert packed.score_positions.tolist() == [1, 2, 1]
    assert packed.score_labels.tolist() == [3, 4, 5]
    assert packed.score_rows.tolist() == [0, 0, 1]
    assert (packed.rows, packed.tokens) == (2, 7)
    assert scored_counts(packed).tolist() == [2, 1]
    assert sequence_sums(torch.tensor([-1.0, -2.0, -0.5]), packed).tolist() == [-3.0, -0.5]


def test_rows_are_chosen_first_then_rejected_and_unshareable_pairs_pack_as_two_sequences():
    """Pair 0's sequences begin differently, so they pack separately (rows 0 and 2); pair 1 shares its
    one-token prompt (rows 1 and 3). Without sharing every sequence packs on its own."""
    differing = {"chosen_input_ids": [1, 2, 3], "chosen_loss_mask": [0, 0, 1],
                 "rejected_input_ids": [9, 2, 4], "rejected_loss_mask": [0, 0, 1], "prompt_length": 2}
    shared = {"chosen_input_ids": [7, 8], "chosen_loss_mask": [0, 1],
              "rejected_input_ids": [7, 6], "rejected_loss_mask": [0, 1], "prompt_length": 1}
    packed = pack_preference([differing, shared])
    assert packed.input_ids.tolist() == [[1, 2, 3, 9, 2, 4, 7, 8, 6]]
    assert packed.score_rows.tolist() == [0, 2, 1, 3]
    assert packed.score_labels.tolist() == [3, 4, 8, 6]
    assert packed.score_positions.tolist() == [1, 4, 6, 6]
    unshared = pack_preference([differing, shared], share_prompt=False)
    assert unshared.input_ids.tolist() == [[1, 2, 3, 9, 2, 4, 7, 8, 7, 6]]
    assert all(block.self_only for block in unshared.blocks)


def test_an_empty_micro_batch_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        pack_sft([])


# --- the same numbers as padded batches -----------------------------------------------------------


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def _pairs(generator: torch.Generator) -> list[dict]:
    """Three pairs with prompts of 1, 5 and 9 tokens and replies of different lengths (one reply of 1 token)."""
    pairs = []
    for prompt_length, chosen_length, rejected_length in [(1, 4, 7), (5, 6, 1), (9, 2, 3)]:
        prompt, chosen, rejected = (torch.randint(3, 97, (n,), generator=generator).tolist()
                                    for n in (prompt_length, chosen_length, rejected_length))
        pairs.append({
            "chosen_input_ids": prompt + chosen, "chosen_loss_mask": [0] * prompt_length + [1] * chosen_length,
            "rejected_input_ids": prompt + rejected, "rejected_loss_mask": [0] * prompt_length + [1] * rejected_length,
            "prompt_length": prompt_length,
        })
    return pairs


def _gradients(model, loss_of) -> torch.Tensor:
    model.zero_grad()
    loss_of().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> bool:
    return bool((a - b).norm() <= rtol * b.norm())


@pytest.mark.parametrize("lora", [False, True], ids=["bare", "lora"])
def test_preference_log_probs_and_gradients_match_padded_batches(lora):
    model = _llama()
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0,
                                                 init_lora_weights=False))
    assert use_packed_attention(model)
    pairs = _pairs(torch.Generator().manual_seed(1))
    padded = collate_preference(pairs, pad_id=0)
    expected = sequence_logprobs(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                                 padded["input_ids"], padded["loss_mask"])
    weights = torch.linspace(1.0, 2.0, 6)  # a loss that weighs every sequence differently

    def padded_loss():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        return (weights * sequence_logprobs(logits, padded["input_ids"], padded["loss_mask"])).sum()

    reference_grads = _gradients(model, padded_loss)
    for share_prompt in (True, False):
        packed = pack_preference(pairs, share_prompt=share_prompt)
        got = sequence_sums(packed_token_logprobs(model, packed), packed)
        assert torch.allclose(got, expected, atol=1e-5), (share_prompt, got, expected)
        grads = _gradients(model, lambda packed=packed: (weights * sequence_sums(
            packed_token_logprobs(model, packed), packed)).sum())
        assert _close(grads, reference_grads), share_prompt
    assert response_lengths(pack_preference(pairs)).tolist() == response_lengths(padded).tolist() == [4, 6, 2, 7, 1, 3]


def test_sft_loss_and_gradients_match_padded_batches_and_only_scored_positions_reach_the_vocabulary():
    model = _llama(seed=2)
    assert use_packed_attention(model)
    generator = torch.Generator().manual_seed(3)
    rows = []
    for length, prompt in [(5, 2), (12, 7), (3, 1)]:
        ids = torch.randint(3, 97, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    padded, packed = sft_batch(rows, 0, packed=False), sft_batch(rows, 0, packed=True)
    assert scored_tokens(packed) == scored_tokens(padded) == 3 + 5 + 2
    assert torch.allclose(scored_nll(model, packed), scored_nll(model, padded), atol=1e-5)
    assert _close(_gradients(model, lambda: scored_nll(model, packed)),
                  _gradients(model, lambda: scored_nll(model, padded)))
    projected = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: projected.append(tuple(out.shape)))
    scored_nll(model, packed)
    hook.remove()
    assert projected == [(1, 10, 97)]  # ten scored tokens, not 20 packed positions (or 3 x 12 padded)


def test_the_switched_model_still_pads_and_generates_as_before():
    """Without packed blocks the switched model is transformers' sdpa: padded scoring and generation are
    unchanged (the stages' evaluation and online sampling use them)."""
    model = _llama(seed=4).eval()
    batch = collate_sft([{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]},
                         {"input_ids": [9, 10], "loss_mask": [0, 1]}], pad_id=0)
    prompts = torch.tensor([[0, 0, 11, 12], [13, 14, 15, 16]])
    prompt_mask = (prompts != 0).long()

    def observe():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sampled = model.generate(input_ids=prompts, attention_mask=prompt_mask, max_new_tokens=5, do_sample=False,
                                 pad_token_id=0)
        return token_logprobs(logits, batch["input_ids"]), sampled

    before_logps, before_sampled = observe()
    assert use_packed_attention(model) and model.config._attn_implementation == IMPLEMENTATION
    after_logps, after_sampled = observe()
    assert torch.equal(before_sampled, after_sampled)
    assert torch.allclose(before_logps, after_logps, atol=1e-6)


def test_models_not_on_sdpa_pad_and_say_why(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, attn_implementation="eager"))
    heard = []

    class Stage:
        padding_free = True

    assert not packs(Stage(), model, heard.append)
    assert model.config._attn_implementation == "eager"
    assert heard and "padding_free" in heard[0] and "padded" in heard[0]
    Stage.padding_free = False
    assert not packs(Stage(), _llama(), heard.append) and len(heard) == 1
    # A switched model saves a config that names no attention implementation: loading it needs no align.
    switched = _llama()
    assert use_packed_attention(switched)
    switched.save_pretrained(tmp_path)
    assert IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    assert isinstance(preference_batch(_pairs(torch.Generator().manual_seed(5)), 0, packed=False), dict)
