"""Rendering conversations with a tokenizer's chat template, and finding the assistant's tokens in them.

The assistant mask of a conversation comes from one of two places:

* the template's ``{% generation %}`` spans, when the template has them (exact, and what
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns);
* otherwise the conversation is rendered prefix by prefix, as the released templates of Llama 3, Qwen2,
  Mistral and Gemma need: for assistant turn ``i``, the turns before it rendered with the generation
  prompt end where the reply starts, and the turns up to and including it end where the reply ends. The
  span is cut after its last special token when only whitespace follows (the newline ChatML and Gemma
  write after ``<|im_end|>`` / ``<end_of_turn>``), so the mask holds the reply and the token that ends
  the turn, as with the generation markers of :data:`align.data.templates.DEFAULT_CHAT_TEMPLATE`.

A template whose renderings do not line up that way (it rewrites earlier turns once later ones follow,
or never writes the reply's text) raises :class:`align.data.load.TemplateError`, which names the template
and shows the rendered sample with the span it would have trained on between ``⟦`` and ``⟧``.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from align.data.load import TemplateError
from align.data.templates import has_generation_markers, template_name

Message = dict[str, Any]
MASK_OPEN, MASK_CLOSE = "⟦", "⟧"
SAMPLE_CHARS = 1500


def apply_template(tokenizer: PreTrainedTokenizerBase, messages: list[Message], **options: Any) -> Any:
    """``apply_chat_template`` with a template failure (``raise_exception``, a Jinja error) as a TemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    except TemplateError:
        raise
    except Exception as error:  # Jinja raises several types; all mean the template cannot render these turns
        roles = ", ".join(message["role"] for message in messages)
        raise TemplateError(
            template_name(tokenizer.chat_template),
            f"cannot render a conversation with roles [{roles}]: {type(error).__name__}: {error}",
            "give conversations the template accepts (many templates need user and assistant turns to "
            "alternate, and some refuse a system turn)",
        ) from error


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of the prompt turns followed by the template's generation prompt."""
    return list(apply_template(tokenizer, messages, add_generation_prompt=True)["input_ids"])


def render_conversation(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], prompts: dict[int, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its assistant mask (see the module docstring).

    ``prompts`` holds renderings the caller already has: ``{i: render_prompt(tokenizer, messages[:i])}``."""
    if has_generation_markers(tokenizer.chat_template):
        encoding = apply_template(tokenizer, messages, return_assistant_tokens_mask=True)
        input_ids, mask = list(encoding["input_ids"]), list(encoding["assistant_masks"])
        if not any(mask) and any(message["role"] == "assistant" for message in messages):
            _refuse(tokenizer, input_ids, mask, "its {% generation %} blocks mark no token of the assistant turns")
        return input_ids, mask
    input_ids = list(apply_template(tokenizer, messages)["input_ids"])
    return input_ids, prefix_mask(tokenizer, messages, input_ids, prompts)


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def prefix_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    input_ids: list[int],
    prompts: dict[int, list[int]] | None = None,
) -> list[int]:
    """The assistant mask of ``input_ids`` (the rendered ``messages``), found by rendering prefixes.

    Each rendering of a prefix must be a prefix of the whole conversation's tokens, but for its last
    token, which may merge with the text that follows it. The last turn's rendering is ``input_ids``
    itself, and ``prompts`` (``{i: render_prompt(tokenizer, messages[:i])}``) saves rendering those again."""
    mask = [0] * len(input_ids)
    special = special_ids(tokenizer)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = prompts[index] if prompts and index in prompts else render_prompt(tokenizer, messages[:index])
        last = index == len(messages) - 1
        through = input_ids if last else list(apply_template(tokenizer, messages[: index + 1])["input_ids"])
        start = common_prefix_length(before, input_ids)
        shared = common_prefix_length(through, input_ids)
        lined_up = start >= len(before) - 1 and shared >= len(through) - 1
        end = _cut_after_last_special(tokenizer, input_ids, start, shared, special)
        for position in range(start, end):
            mask[position] = 1
        if not lined_up or end <= start or message["content"].strip() not in _decode(tokenizer, input_ids[start:end]):
            _refuse(
                tokenizer,
                input_ids,
                mask,
                f"rendering the conversation turn by turn does not isolate assistant turn {index}: the turns "
                "before it with the generation prompt, and the turns up to it, do not start the whole "
                "conversation's tokens (the template renders earlier turns differently once later turns follow, "
                "or does not write the reply's text)",
            )
    return mask


def _cut_after_last_special(
    tokenizer: PreTrainedTokenizerBase, input_ids: list[int], start: int, end: int, special: set[int]
) -> int:
    """Drop what follows the span's last special token when it is only whitespace (``<|im_end|>\\n``)."""
    for position in range(end - 1, start - 1, -1):
        if input_ids[position] in special:
            if not _decode(tokenizer, input_ids[position + 1 : end]).strip():
                return position + 1
            return end
    return end


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens: its named ones and every added token marked special."""
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def marked_sample(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], mask: list[int]) -> str:
    """The rendered text with each masked span between ``⟦`` and ``⟧``, cut to a readable length."""
    pieces, run, masked = [], [], False
    for token, keep in zip(input_ids, mask):
        if bool(keep) != masked:
            pieces.append(_decode(tokenizer, run) + (MASK_OPEN if keep else MASK_CLOSE))
            run, masked = [], bool(keep)
        run.append(token)
    pieces.append(_decode(tokenizer, run) + (MASK_CLOSE if masked else ""))
    text = "".join(pieces)
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " ..."


def _refuse(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], mask: list[int], problem: str) -> None:
    shown = "the masked span is between ⟦ and ⟧" if any(mask) else "no token is masked"
    raise TemplateError(
        template_name(tokenizer.chat_template),
        f"cannot mark the assistant tokens: {problem}",
        "use a template whose earlier turns render the same whatever follows, or wrap each assistant reply in "
        "{% generation %} ... {% endgeneration %} (as align.data.templates.DEFAULT_CHAT_TEMPLATE does)",
        sample=f"rendered sample ({shown}):\n{marked_sample(tokenizer, input_ids, mask)}",
    )
