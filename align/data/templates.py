"""Chat templates.

``DEFAULT_CHAT_TEMPLATE`` is the template of the built-in tokenizer and the fallback for a tokenizer
that has none. Assistant turns are wrapped in ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks exactly the tokens the model
should learn to produce, the closing ``<|end|>`` (the EOS token) included. The generation prompt
(``<|assistant|>`` and a newline) is exactly the text that opens a rendered assistant turn, so a prompt
rendered with ``add_generation_prompt=True`` is a prefix of the same conversation with the reply.
"""

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
