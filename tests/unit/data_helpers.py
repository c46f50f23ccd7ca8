"""A tiny byte-level BPE tokenizer built in memory, for data tests that must not touch the model hub."""

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN, PAD, SPECIAL_TOKENS

_SUBJECTS = ("the model", "a user", "my cat", "the teacher", "our team", "this answer", "Paris", "a prime")
_VERBS = ("writes", "explains", "answers", "likes", "counts", "reads", "is", "helps")
_OBJECTS = ("a short poem", "the capital of France", "two plus two", "every question", "the sky", "numbers")
_ENDINGS = (".", "!", "?", ", thanks.", " today.", " again and again.")


def training_lines(count: int = 300) -> list[str]:
    """Deterministic English-like lines with digits and punctuation, enough to train a small BPE."""
    combos = itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)
    return [f"{s.capitalize()} {v} {o}{e} {i}" for i, (s, v, o, e) in zip(range(count), combos)]


def build_tokenizer(pad_is_eos: bool = False, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with align's special tokens and ``DEFAULT_CHAT_TEMPLATE``.

    ``<|end|>`` is the EOS token; the pad token is ``<|pad|>``, or ``<|end|>`` too when ``pad_is_eos``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_lines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TURN,
        pad_token=END_OF_TURN if pad_is_eos else PAD,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
