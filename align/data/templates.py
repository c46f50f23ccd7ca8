"""Chat templates.

``DEFAULT_CHAT_TEMPLATE`` is the template of the built-in tokenizer and the fallback for a tokenizer
that has none. Assistant turns are wrapped in ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens the model
should learn to produce, the closing ``<|end|>`` (the EOS token) included. The generation prompt
(``<|assistant|>`` and a newline) is exactly the text that opens a rendered assistant turn, so a prompt
rendered with ``add_generation_prompt=True`` is a prefix of the same conversation with the reply.
"""

import hashlib
import re

END_OF_TURN = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, END_OF_TURN, *ROLE_TOKENS)

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}\n"
    "{%- else -%}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>\n{% endif -%}"
)

_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
_FAMILIES = (
    ("<|im_start|>", "ChatML"),
    ("<|start_header_id|>", "Llama-3 headers"),
    ("[INST]", "Mistral [INST]"),
    ("<start_of_turn>", "Gemma turns"),
)


def has_generation_markers(template: str | None) -> bool:
    """Whether a template wraps assistant replies in ``{% generation %}`` blocks."""
    return bool(template) and _GENERATION_MARKER.search(template) is not None


def template_name(template: str | None) -> str:
    """How an error names a chat template: its style, when recognised, and the start of its text's sha256."""
    if not template:
        return "no chat template"
    if template == DEFAULT_CHAT_TEMPLATE:
        style = "align's default"
    else:
        style = next((name for marker, name in _FAMILIES if marker in template), "custom")
    digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:12]
    return f"{style} chat template (sha256 {digest})"
