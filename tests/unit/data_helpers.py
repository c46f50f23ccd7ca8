"""A tiny byte-level BPE tokenizer built in memory, for data tests that must not touch the model hub."""

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


def build_tokenizer(
    pad_is_eos: bool = False,
    vocab_size: int = 400,
    bos: str | None = None,
    eos: str = END_OF_TURN,
    extra_special: tuple[str, ...] = (),
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with align's special tokens and ``DEFAULT_CHAT_TEMPLATE``.

    ``<|end|>`` is the EOS token; the pad token is ``<|pad|>``, or ``<|end|>`` too when ``pad_is_eos``.
    With ``bos`` (e.g. ``"<s>"``) it has that BOS token, which encoding text puts first, as Llama's
    tokenizers do. ``eos`` and ``extra_special`` (another model family's turn markers) add special tokens
    after align's, and ``chat_template`` replaces the default template.
    """
    added = [token for token in (bos, eos, *extra_special) if token and token not in SPECIAL_TOKENS]
    special = [*SPECIAL_TOKENS, *dict.fromkeys(added)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_lines(), trainer)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=eos if pad_is_eos else PAD,
        chat_template=chat_template,
        additional_special_tokens=list(extra_special),
        **({"bos_token": bos} if bos else {}),
    )


# Chat templates as the models ship them (tokenizer_config.json "chat_template"), for tests of assistant
# masks on templates without {% generation %} markers. Each style's special tokens are in STYLE_TOKENS.

QWEN2_TEMPLATE = (  # Qwen/Qwen2-7B-Instruct (ChatML, a default system turn when there is none)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
"""mistralai/Mistral-7B-Instruct-v0.2 (and v0.1 since its template update): the system message opens the
first user turn; there is no generation prompt, the reply follows ``[/INST]``."""

MISTRAL_V3_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- for message in loop_messages | rejectattr("role", "equalto", "tool") | rejectattr("role", "equalto", "tool_results") | selectattr("tool_calls", "undefined") %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""
"""mistralai/Mistral-7B-Instruct-v0.3 without its tool-calling branches: the system message goes into the
*last* user turn only, so a conversation that ends with the reply renders without it, and the prompt
alone renders differently from the start of the conversation."""

GEMMA_TEMPLATE = (  # google/gemma-7b-it and gemma-2-*-it: no system role
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

STYLE_TOKENS = {
    "chatml": {"chat_template": QWEN2_TEMPLATE, "eos": "<|im_end|>", "extra_special": ("<|im_start|>",)},
    "llama3": {
        "chat_template": LLAMA3_TEMPLATE,
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra_special": ("<|start_header_id|>", "<|end_header_id|>"),
    },
    "mistral": {"chat_template": MISTRAL_TEMPLATE, "bos": "<s>", "eos": "</s>", "extra_special": ("[INST]", "[/INST]")},
    "mistral_v3": {
        "chat_template": MISTRAL_V3_TEMPLATE, "bos": "<s>", "eos": "</s>", "extra_special": ("[INST]", "[/INST]"),
    },
    "gemma": {
        "chat_template": GEMMA_TEMPLATE,
        "bos": "<bos>",
        "eos": "<eos>",
        "extra_special": ("<start_of_turn>", "<end_of_turn>"),
    },
}


def style_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """The tiny tokenizer with a model family's turn tokens and its chat template as shipped."""
    return build_tokenizer(**STYLE_TOKENS[style])


def build_small_model(path: Path, **config) -> Path:
    """The small model (``config`` overrides its LlamaConfig, e.g. biases) and its tokenizer, saved in ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
