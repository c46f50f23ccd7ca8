"""Sampling interface for the online RL stages, so the loop never depends on one inference engine.

A :class:`Generator` turns token-id prompts into completions. :class:`HFGenerator` implements it on
Hugging Face ``generate``; :class:`CachedGenerator`, which the stages use, runs its own sampling
loop over the same model, encoding each prompt once for all its samples and drawing the same
tokens. A vLLM or SGLang engine can implement the same protocol.

A prefix- or prompt-tuned peft model samples through :class:`CachedGenerator` only. With the transformers
release align runs on, peft's ``generate`` leaves a prefix's keys and values out (a prefix-tuned model
generates what its base model would) and, for prompt tuning, picks other tokens than the model's own greedy
choice once prompts are padded or after the first new token; the loop here places the virtual tokens as the
model's forward does in training.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from align.models.adapters import is_prompt_learning


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions."""

    max_new_tokens: int
    """Most tokens generated per completion, EOS included (≥ 1)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (argmax at every step)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps the whole distribution. Ignored when greedy."""
    num_samples: int = 1
    """Completions per prompt (≥ 1), returned next to each other: the groups of GRPO and RLOO."""
    seed: int = 0
    """Seed of the sampling random stream: the same seed, prompts and weights give the same completions."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int
    """Index of its prompt in the list given to :meth:`Generator.generate`."""
    token_ids: list[int]
    """Generated tokens only (no prompt, no padding), ending with EOS when ``finished``."""
    text: str
    """``token_ids`` decoded without special tokens."""
    finished: bool
    """True when the completion ended with EOS, False when cut at ``max_new_tokens``."""


@runtime_checkable
class Generator(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Sample ``params.num_samples`` completions of each prompt.

        Returns ``len(prompts) * num_samples`` completions ordered by prompt, the samples of one
        prompt contiguous: completion ``i`` continues prompt ``i // num_samples``.
        """
        ...


class HFGenerator:
    """:class:`Generator` on a Hugging Face causal LM's ``generate``.

    Prompts are left-padded into one batch. Sampling flags are set explicitly (``top_k=0``, no
    repetition penalty, ...) rather than taken from the model's ``generation_config``: the RL losses
    assume the completions were sampled from the policy's own distribution at ``temperature`` and
    ``top_p``. The model is put in eval mode while generating and restored afterwards.

    Args:
        model: a ``transformers`` causal LM (or a peft wrapper of one).
        tokenizer: provides ``eos_token_id``, ``pad_token_id`` (EOS is used when None) and
            ``decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError(
                "HFGenerator needs a tokenizer with an eos_token_id to know where completions end"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else int(pad)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {row} is empty; every prompt needs at least one token")
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        device = self._device()
        return input_ids.to(device), attention_mask.to(device)

    def _sampling_kwargs(self, params: SamplingParams) -> dict[str, Any]:
        # Processors that apply in both modes, set to no-ops over whatever the model's config says.
        kwargs: dict[str, Any] = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0}
        if params.greedy:
            return {**kwargs, "do_sample": False}
        return {
            **kwargs,
            "do_sample": True,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0,
        }

    def _completion(self, prompt_index: int, new_tokens: list[int]) -> Completion:
        if self.eos_token_id in new_tokens:
            token_ids = new_tokens[: new_tokens.index(self.eos_token_id) + 1]
            finished = True
        else:
            # Without EOS nothing was padded: generate pads only rows that have finished.
            token_ids, finished = new_tokens, False
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Completion(prompt_index=prompt_index, token_ids=token_ids, text=text, finished=finished)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        input_ids, attention_mask = self._left_padded(prompts)
        device = input_ids.device
        was_training = self.model.training
        self.model.eval()
        # A private random stream: reproducible from params.seed, and the caller's RNG state is untouched.
        fork_devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
                torch.manual_seed(params.seed)
                sequences = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.num_samples,
                    eos_token_id=self.eos_token_id,
                    pad_token_id=self.pad_token_id,
                    **self._sampling_kwargs(params),
                )
        finally:
            self.model.train(was_training)
        new_tokens = sequences[:, input_ids.shape[1] :].tolist()
        return [self._completion(row // params.num_samples, tokens) for row, tokens in enumerate(new_tokens)]


def cache_argument(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a forward call of ``model`` (a transformers model or a peft wrapper): the
    KV-cache argument is ``cache`` in newer transformers releases and ``past_key_values`` before."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # a DeepSpeed engine
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {_cache_argument_name(type(inner)): cache}


@functools.cache
def _cache_argument_name(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class CachedGenerator(HFGenerator):
    """:class:`Generator` with its own sampling loop over a Hugging Face causal LM and its KV cache.

    Each prompt is encoded once and its cache copied for its ``num_samples`` completions (``generate``
    encodes every copy), and the loop does only what sampling needs: temperature, top-p, a draw,
    stop at EOS. Tokens are drawn as Hugging Face ``generate`` draws them (float32 logits, the same
    warpers, ``torch.multinomial`` on one seeded stream), so the completions follow the same
    distribution, and greedy decoding gives the same tokens.

    With ``synced`` (ZeRO-3, where every forward gathers parameters from all ranks) every rank keeps
    stepping until all ranks' completions have finished, like ``generate(synced_gpus=True)``.

    A prefix- or prompt-tuned peft model (prompt learning) is run as its forward runs in training: its
    virtual tokens first, the real tokens at positions from ``num_virtual_tokens`` on. The loop calls the
    base model itself, with the prefix's keys and values as the first entries of the cache, or the prompt's
    virtual embeddings in front of each left-padded prompt (``[virtual][padding][prompt]``).
    """

    def __init__(self, model: Any, tokenizer: Any, synced: bool = False) -> None:
        super().__init__(model, tokenizer)
        self.synced = synced

    def _all_finished(self, finished: torch.Tensor) -> bool:
        done = bool(finished.all())
        if self.synced and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([0.0 if done else 1.0], device=finished.device)
            torch.distributed.all_reduce(flag)
            return flag.item() == 0.0
        return done

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not prompts:
            return []
        input_ids, attention_mask = self._left_padded(prompts)
        device = input_ids.device
        n = params.num_samples
        was_training = self.model.training
        self.model.eval()
        fork_devices = [device] if device.type == "cuda" else []
        drawn: list[torch.Tensor] = []
        try:
            with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
                torch.manual_seed(params.seed)
                model, cache, attention_mask, position, logits = self._prefill(input_ids, attention_mask)
                if n > 1:
                    cache.batch_repeat_interleave(n)
                logits = logits.repeat_interleave(n, dim=0)
                attention_mask = attention_mask.repeat_interleave(n, dim=0)
                position = position.repeat_interleave(n, dim=0)
                finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
                for step in range(params.max_new_tokens):
                    tokens = torch.where(finished, self.pad_token_id, self._draw(logits.float(), params))
                    drawn.append(tokens)
                    finished |= tokens == self.eos_token_id
                    if step + 1 == params.max_new_tokens or self._all_finished(finished):
                        break
                    attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                    position = position + 1
                    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position,
                                use_cache=True, **cache_argument(model, cache))
                    logits = out.logits[:, -1]
        finally:
            self.model.train(was_training)
        # Rows that finished early hold padding after their EOS, which _completion cuts off.
        rows = torch.stack(drawn, dim=1).tolist()
        return [self._completion(row // n, tokens) for row, tokens in enumerate(rows)]

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Encode the left-padded prompts: ``(model, cache, attention_mask, position, logits)``, where ``model``
        runs the decoding steps on ``cache``, ``attention_mask`` covers every cached position, ``position``
        (batch, 1) is each prompt's last position and ``logits`` (batch, vocab) predict the first token."""
        from transformers import DynamicCache

        if not is_prompt_learning(self.model):
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()  # filled in place by each forward
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, logits_to_keep=1, **cache_argument(self.model, cache))
            return self.model, cache, attention_mask, positions[:, -1:], out.logits[:, -1]
        peft_model = self.model
        config, base = peft_model.active_peft_config, peft_model.get_base_model()
        batch, virtual = input_ids.shape[0], config.num_virtual_tokens
        attention_mask = torch.cat([attention_mask.new_ones(batch, virtual), attention_mask], dim=1)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if config.peft_type == "PREFIX_TUNING":
            cache = peft_model.get_prompt(batch_size=batch)  # the prefix's keys and values, in a DynamicCache
            inputs = {"input_ids": input_ids, "position_ids": positions[:, virtual:]}
        else:
            cache = DynamicCache()
            embeddings = peft_model.word_embeddings(input_ids)
            prompt = peft_model.get_prompt(batch_size=batch).to(embeddings.dtype)
            inputs = {"inputs_embeds": torch.cat([prompt, embeddings], dim=1), "position_ids": positions}
        out = base(**inputs, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                   **cache_argument(base, cache))
        return base, cache, attention_mask, positions[:, -1:], out.logits[:, -1]

    @staticmethod
    def _draw(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        if params.greedy:
            return logits.argmax(dim=-1)
        if params.temperature != 1.0:
            logits = logits / params.temperature
        if params.top_p < 1.0:
            # As transformers' TopPLogitsWarper: drop the least likely tokens whose mass is <= 1 - top_p.
            sorted_logits, order = torch.sort(logits, descending=False)
            drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - params.top_p)
            drop[..., -1:] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)
