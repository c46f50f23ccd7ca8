"""Tests for align.generation: sampling parameters and both generators (Hugging Face ``generate`` and
the cached sampling loop) on a tiny random Llama."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align.generation import CachedGenerator, Completion, Generator, HFGenerator, SamplingParams

VOCAB = 64
PAD = 63
PROMPTS = [[5, 17, 3], [9], [40, 41, 42, 43, 44, 45]]


class _Tokenizer:
    """The three things HFGenerator uses from a tokenizer: EOS and pad ids and ``decode``."""

    def __init__(self, eos_token_id: int, pad_token_id: int | None = PAD) -> None:
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def decode(self, token_ids, skip_special_tokens=False):
        special = {self.eos_token_id, self.pad_token_id}
        return " ".join(f"t{i}" for i in token_ids if not (skip_special_tokens and i in special))


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(params=[HFGenerator, CachedGenerator])
def generator_class(request):
    return request.param


@torch.no_grad()
def _argmax_decode(model, prompt, max_new_tokens, eos_token_id=None):
    """Greedy decoding one prompt at a time, no padding and no KV cache: argmax of the last logits."""
    ids = torch.tensor([prompt])
    new_tokens = []
    for _ in range(max_new_tokens):
        next_token = int(model(input_ids=ids).logits[0, -1].argmax())
        new_tokens.append(next_token)
        if next_token == eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[next_token]])], dim=1)
    return new_tokens


def _first_new_token(tokens, start):
    """Index ≥ start of the first token that does not occur earlier in ``tokens``."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_greedy_equals_stepwise_argmax_with_eos_and_left_padding(tiny_llama, generator_class):
    """Prompts of lengths 3, 1 and 6 share one left-padded batch. EOS is chosen as a token that greedy
    decoding of prompt 0 produces for the first time at step k ≥ 2, so prompt 0 stops there with EOS
    kept; every completion equals independent step-by-step argmax decoding with the same EOS, and
    those without EOS run to max_new_tokens with no padding."""
    max_new_tokens = 8
    free_run = _argmax_decode(tiny_llama, PROMPTS[0], max_new_tokens)
    stop_at = _first_new_token(free_run, 2)
    eos = free_run[stop_at]
    generator = generator_class(tiny_llama, _Tokenizer(eos_token_id=eos))
    assert isinstance(generator, Generator)
    completions = generator.generate(PROMPTS, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))

    assert [c.prompt_index for c in completions] == [0, 1, 2]
    assert completions[0].token_ids == free_run[: stop_at + 1]
    assert completions[0].finished and completions[0].token_ids[-1] == eos
    assert f"t{eos}" not in completions[0].text.split()
    for prompt, completion in zip(PROMPTS, completions):
        expected = _argmax_decode(tiny_llama, prompt, max_new_tokens, eos_token_id=eos)
        assert completion.token_ids == expected
        assert completion.finished == (expected[-1] == eos)
        assert completion.finished or len(completion.token_ids) == max_new_tokens
        assert eos not in completion.token_ids[:-1]


def test_sampling_shapes_order_and_no_padding(tiny_llama, generator_class):
    """3 prompts x 4 samples: 12 completions, samples of a prompt contiguous, each at most
    max_new_tokens long, EOS only at the end of finished ones, never a pad token after it."""
    eos = 7
    params = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.95, num_samples=4, seed=3)
    completions = generator_class(tiny_llama, _Tokenizer(eos_token_id=eos)).generate(PROMPTS, params)
    assert len(completions) == 12
    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    for completion in completions:
        assert isinstance(completion, Completion)
        assert 1 <= len(completion.token_ids) <= 6
        assert eos not in completion.token_ids[:-1]
        assert completion.finished == (completion.token_ids[-1] == eos)
        assert completion.finished or len(completion.token_ids) == 6
        # The model may sample the pad id as a real token; like EOS, it is kept in token_ids, not in text.
        assert completion.text == " ".join(f"t{i}" for i in completion.token_ids if i not in (eos, PAD))
    # At temperature 1.5 over 64 tokens, four samples of one prompt are not all identical.
    assert len({tuple(c.token_ids) for c in completions[:4]}) > 1


def test_sampling_is_reproducible_from_seed_and_leaves_global_rng_alone(tiny_llama, generator_class):
    generator = generator_class(tiny_llama, _Tokenizer(eos_token_id=7))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2, seed=11)
    rng_state = torch.get_rng_state()
    first = generator.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert generator.generate(PROMPTS, params) == first
    other_seed = generator.generate(
        PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2, seed=12)
    )
    assert [c.token_ids for c in other_seed] != [c.token_ids for c in first]


def test_tiny_top_p_sampling_equals_greedy(tiny_llama, generator_class):
    """top_p → 0 keeps only the most likely token at each step, so sampling reproduces greedy decoding:
    evidence that top_p reaches Hugging Face's sampler."""
    generator = generator_class(tiny_llama, _Tokenizer(eos_token_id=7))
    greedy = generator.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.0))
    nucleus = generator.generate(
        PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=5)
    )
    assert nucleus == greedy


def test_model_generation_config_does_not_change_the_sampler(tiny_llama, generator_class):
    """A model whose generation_config asks for top_k = 1 and a repetition penalty of 10 would make
    sampling greedy and break prompt 0's repeating greedy loop; HFGenerator overrides both."""
    generator = generator_class(tiny_llama, _Tokenizer(eos_token_id=PAD))
    config = tiny_llama.generation_config
    saved = (config.top_k, config.repetition_penalty)
    config.top_k, config.repetition_penalty = 1, 10.0
    try:
        greedy = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, temperature=0.0))
        samples = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, num_samples=4, seed=1))
    finally:
        config.top_k, config.repetition_penalty = saved
    assert greedy[0].token_ids == _argmax_decode(tiny_llama, PROMPTS[0], 6, eos_token_id=PAD)
    assert len({tuple(c.token_ids) for c in samples}) > 1


def test_generate_restores_training_mode_and_uses_eos_as_pad_when_missing(tiny_llama, generator_class):
    """A tokenizer without a pad token pads with EOS; a model in train mode is back in train mode."""
    generator = generator_class(tiny_llama, _Tokenizer(eos_token_id=7, pad_token_id=None))
    assert generator.pad_token_id == 7
    tiny_llama.train()
    try:
        completions = generator.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, temperature=0.0))
        assert tiny_llama.training
    finally:
        tiny_llama.eval()
    assert len(completions) == 2
    assert generator.generate([], SamplingParams(max_new_tokens=3)) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generator.generate([[1], []], SamplingParams(max_new_tokens=3))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4, "temperature": -0.5}, "temperature"),
        ({"max_new_tokens": 4, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 4, "top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 4, "num_samples": 0}, "num_samples"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_hf_generator_needs_eos():
    with pytest.raises(ValueError, match="eos_token_id"):
        HFGenerator(torch.nn.Linear(1, 1), _Tokenizer(eos_token_id=None))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=12, num_samples=4, seed=5),
        SamplingParams(max_new_tokens=12, num_samples=3, temperature=0.7, top_p=0.8, seed=9),
        SamplingParams(max_new_tokens=12, temperature=0.0),
    ],
    ids=["sample", "temperature-top-p", "greedy"],
)
def test_cached_generator_draws_what_generate_draws(tiny_llama, params):
    # Same seed, same prompts (left-padded, one prompt encoded once for its samples): the same tokens.
    # EOS is a token the first completion draws third, so completions end early on both sides.
    eos = HFGenerator(tiny_llama, _Tokenizer(eos_token_id=62)).generate(PROMPTS, params)[0].token_ids[2]
    tokenizer = _Tokenizer(eos_token_id=eos)
    expected = HFGenerator(tiny_llama, tokenizer).generate(PROMPTS, params)
    got = CachedGenerator(tiny_llama, tokenizer).generate(PROMPTS, params)
    assert got == expected
    assert expected[0].finished and len(expected[0].token_ids) <= 3


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_completion_logps_equal_a_forward_over_prompt_and_completion(tiny_llama, shared_prefix):
    from peft import LoraConfig, get_peft_model

    from align.ops.logprobs import token_logprobs
    from align.stages.rollout import completion_batch, completion_logps, group_batch

    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    params = SamplingParams(max_new_tokens=6, num_samples=3, seed=2)
    eos = CachedGenerator(model, _Tokenizer(eos_token_id=62)).generate(PROMPTS, params)[0].token_ids[2]
    completions = CachedGenerator(model, _Tokenizer(eos_token_id=eos)).generate(PROMPTS, params)
    assert len({len(c.token_ids) for c in completions}) > 1, "completions of one length test no padding"
    prompts = [{"prompt_input_ids": p} for p in PROMPTS]

    def gradients(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    grouped = group_batch(prompts, completions, 3, PAD)
    logps = completion_logps(model, grouped, 3, shared_prefix=shared_prefix)
    mask = grouped["completion_mask"].bool()
    full = completion_batch(prompts, completions, PAD)
    expected = token_logprobs(model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits[:, :-1],
                              full["input_ids"][:, 1:])
    expected_mask = full["loss_mask"][:, 1:].bool()
    torch.testing.assert_close(logps[mask], expected[expected_mask], rtol=0, atol=2e-6)
    got_grads, expected_grads = gradients(logps[mask].sum()), gradients(expected[expected_mask].sum())
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-4, atol=2e-6)
