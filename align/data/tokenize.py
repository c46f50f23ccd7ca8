"""Turning validated rows into token ids and loss masks, the way TRL does.

Conversational rows (lists of messages: ``messages``, conversational ``prompt``/``completion``,
``preference_conversational``) are rendered by ``tokenizer.apply_chat_template``. The loss mask is the
assistant mask of :mod:`align.data.render`: 1 on the tokens of assistant replies and the token that
ends each reply, 0 on system and user turns and on the role headers. It comes from the template's
``{% generation %}`` spans when it has them, otherwise from rendering the conversation prefix by prefix.
It is never derived from ``input_ids != pad_id``, which would lose the EOS when the pad token is the EOS
token.

Plain-text rows (string ``prompt``/``completion``, ``prompt``/``chosen``/``rejected`` and ``prompt``
values) follow TRL 1.x (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``) and use no chat template: the
EOS token's text is appended to each reply unless it already ends with it, ``prompt`` and
``prompt + reply`` are each encoded with ``tokenizer(text)`` (so a tokenizer that adds a BOS, as Llama's
do, adds it here too), and the reply is what follows the first token where the two encodings differ.
The reply tokens, EOS included, carry the loss. A prompt for generation is ``tokenizer(prompt)``.

Truncation policy
-----------------
SFT rows longer than ``max_length``:

* ``"right"`` keeps the first ``max_length`` tokens (the end of the reply, EOS included, is lost);
* ``"left"`` removes tokens from the start of the prompt side and keeps the final assistant reply
  whole; a final reply longer than ``max_length`` on its own is cut on the right instead;
* ``"drop"`` skips the row.

Preference rows: the prompt is cut from the left to ``max_prompt_length`` tokens, then each reply is
cut on the right so that prompt + reply fits in ``max_length``.

Prompts for generation are cut from the left to ``max_prompt_length``.

A row left with no loss tokens after truncation (or whose prompt alone fills ``max_length``) is
skipped: the tokenize functions return ``None`` and ``tokenize_dataset`` counts it as dropped.
"""

import logging
from collections.abc import Iterable
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from align.data.load import Format, Kind, split_implicit_prompt
from align.data.render import common_prefix_length, render_conversation, render_prompt
from align.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN

logger = logging.getLogger(__name__)

Truncation = Literal["right", "left", "drop"]
Message = dict[str, Any]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a chat template ``DEFAULT_CHAT_TEMPLATE``."""
    if tokenizer.chat_template:
        return
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.convert_tokens_to_ids(END_OF_TURN) in (None, tokenizer.unk_token_id):
        logger.warning(
            "The tokenizer has no chat template and no %s token; the default template will spell %s "
            "out as text, so the model will not learn to stop with a single EOS token.",
            END_OF_TURN,
            END_OF_TURN,
        )


def _as_messages(value: str | list[Message], role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [{"role": message["role"], "content": message["content"]} for message in value]


def sft_conversation(row: dict[str, Any], fmt: Format) -> list[Message]:
    """The whole conversation of an SFT row: a ``prompt`` string becomes a user turn, a ``completion``
    string an assistant turn."""
    if fmt == "messages":
        return _as_messages(row["messages"], "user")
    if fmt == "prompt_completion":
        return _as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")
    raise ValueError(f"format {fmt!r} is not an SFT format; expected 'messages' or 'prompt_completion'")


def preference_conversations(
    row: dict[str, Any], fmt: Format
) -> tuple[list[Message], list[Message], list[Message]]:
    """The prompt turns and the chosen and rejected reply turns of a preference row."""
    if fmt == "preference":
        prompt = _as_messages(row["prompt"], "user")
        return prompt, _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
    if fmt == "preference_conversational":
        chosen, rejected = (
            _as_messages(row["chosen"], "assistant"),
            _as_messages(row["rejected"], "assistant"),
        )
        if row.get("prompt") is not None:
            return _as_messages(row["prompt"], "user"), chosen, rejected
        return split_implicit_prompt(chosen, rejected)
    raise ValueError(
        f"format {fmt!r} is not a preference format; expected 'preference' or 'preference_conversational'"
    )


def prompt_and_reference(row: dict[str, Any], fmt: Format) -> tuple[list[Message], str | None]:
    """The prompt turns of a row of any format, and the text of its reference answer if it has one."""
    if fmt == "prompt":
        return _as_messages(row["prompt"], "user"), None
    if fmt in ("prompt_completion", "unpaired"):
        completion = row.get("completion")
        if fmt == "unpaired" and not row.get("label"):
            completion = None  # an undesirable completion is no reference answer
        reference = None if completion is None else _as_messages(completion, "assistant")[-1]["content"]
        return _as_messages(row["prompt"], "user"), reference
    if fmt == "messages":
        messages = _as_messages(row["messages"], "user")
        if messages[-1]["role"] == "assistant":
            return messages[:-1], messages[-1]["content"]
        return messages, None
    prompt, chosen, _ = preference_conversations(row, fmt)
    return prompt, chosen[-1]["content"]


def is_text_row(row: dict[str, Any], fmt: Format) -> bool:
    """Whether a row is plain text (TRL's non-conversational rows): its prompt and reply values are strings.

    A ``prompt_completion`` row that mixes a string with a list of messages is conversational."""
    if fmt == "preference":
        return True
    if fmt == "prompt":
        return isinstance(row["prompt"], str)
    if fmt in ("prompt_completion", "unpaired"):
        return isinstance(row["prompt"], str) and isinstance(row.get("completion"), (str, type(None)))
    return False


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of plain text as TRL encodes it: ``tokenizer(text)``, special tokens (a BOS) included."""
    return list(tokenizer(text)["input_ids"])


def _with_eos(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The reply text followed by the EOS token's text, unless it already ends with it (as TRL does)."""
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token, so a plain-text reply cannot be ended; set eos_token")
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def _text_replies(
    tokenizer: PreTrainedTokenizerBase, prompt: str, replies: list[str]
) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and each reply's ids (EOS appended) as TRL splits ``prompt + reply``: the reply
    starts where the encodings of the prompt alone and of prompt + reply first differ."""
    prompt_ids = _text_ids(tokenizer, prompt)
    joined = [_text_ids(tokenizer, prompt + _with_eos(tokenizer, reply)) for reply in replies]
    shared = min(common_prefix_length(prompt_ids, ids) for ids in joined)
    return prompt_ids[:shared], [ids[shared:] for ids in joined]


def _conversation_replies(
    tokenizer: PreTrainedTokenizerBase, prompt: list[Message], *replies: list[Message]
) -> tuple[list[int], ...]:
    """The prompt's ids (generation prompt included) and each reply's ids and assistant mask.

    As TRL does, each reply starts where the rendered prompt and the rendered prompt + reply first
    differ (the shorter of the two for chosen and rejected), so a template that renders the prompt alone
    a little differently still splits cleanly."""
    prompt_ids = render_prompt(tokenizer, prompt)
    rendered = [render_conversation(tokenizer, prompt + reply, {len(prompt): prompt_ids}) for reply in replies]
    shared = min(common_prefix_length(prompt_ids, ids) for ids, _ in rendered)
    return (prompt_ids[:shared], *((ids[shared:], mask[shared:]) for ids, mask in rendered))


def _final_reply_start(loss_mask: list[int]) -> int:
    """Index of the first token of the last run of loss tokens (the final assistant reply)."""
    start = len(loss_mask)
    while start > 0 and not loss_mask[start - 1]:
        start -= 1
    while start > 0 and loss_mask[start - 1]:
        start -= 1
    return start


def tokenize_sft(
    row: dict[str, Any],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: Truncation = "right",
) -> dict[str, list[int]] | None:
    """``{"input_ids", "loss_mask"}`` of an SFT row, or ``None`` if truncation leaves nothing to learn.

    See the module docstring for the truncation policy.
    """
    if is_text_row(row, fmt):
        prompt_ids, (completion_ids,) = _text_replies(tokenizer, row["prompt"], [row["completion"]])
        input_ids, loss_mask = prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
    else:
        ensure_chat_template(tokenizer)
        input_ids, loss_mask = render_conversation(tokenizer, sft_conversation(row, fmt))
    if len(input_ids) > max_length:
        if truncation == "drop":
            return None
        if truncation == "right":
            keep = slice(0, max_length)
        elif truncation == "left":
            reply_start = _final_reply_start(loss_mask)
            if len(input_ids) - reply_start <= max_length:
                keep = slice(len(input_ids) - max_length, len(input_ids))
            else:
                keep = slice(reply_start, reply_start + max_length)
        else:
            raise ValueError(f"truncation must be 'right', 'left' or 'drop', got {truncation!r}")
        input_ids, loss_mask = input_ids[keep], loss_mask[keep]
    if not any(loss_mask):
        return None
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def tokenize_preference(
    row: dict[str, Any],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
) -> dict[str, Any] | None:
    """Chosen and rejected sequences sharing one rendering of the prompt.

    Returns ``chosen_input_ids``, ``chosen_loss_mask``, ``rejected_input_ids``, ``rejected_loss_mask``
    and ``prompt_length`` (both sequences start with the same ``prompt_length`` tokens, masked 0), or
    ``None`` when the prompt leaves no room for a reply token under ``max_length``.
    """
    if is_text_row(row, fmt):
        prompt_ids, (chosen_ids, rejected_ids) = _text_replies(
            tokenizer, row["prompt"], [row["chosen"], row["rejected"]]
        )
        chosen_mask, rejected_mask = [1] * len(chosen_ids), [1] * len(rejected_ids)
    else:
        ensure_chat_template(tokenizer)
        prompt_ids, (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = _conversation_replies(
            tokenizer, *preference_conversations(row, fmt)
        )
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    reply_room = max_length - len(prompt_ids)
    chosen_ids, chosen_mask = chosen_ids[:reply_room], chosen_mask[:reply_room]
    rejected_ids, rejected_mask = rejected_ids[:reply_room], rejected_mask[:reply_room]
    if reply_room <= 0 or not any(chosen_mask) or not any(rejected_mask):
        return None
    prompt_mask = [0] * len(prompt_ids)
    return {
        "chosen_input_ids": prompt_ids + chosen_ids,
        "chosen_loss_mask": prompt_mask + chosen_mask,
        "rejected_input_ids": prompt_ids + rejected_ids,
        "rejected_loss_mask": prompt_mask + rejected_mask,
        "prompt_length": len(prompt_ids),
    }


def tokenize_unpaired(
    row: dict[str, Any],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
) -> list[dict[str, Any]]:
    """The rows KTO trains on: ``{"prompt_ids", "completion_ids", "completion_mask", "label"}`` each.

    An ``unpaired`` row gives one (``label`` True for a desirable completion); a preference row gives two,
    its chosen answer desirable and its rejected one undesirable. Prompts and replies are cut as for
    preference rows (the prompt from the left to ``max_prompt_length``, the reply on the right to fit
    ``max_length``); a reply left with no loss token is left out.
    """
    if fmt == "unpaired":
        if is_text_row(row, fmt):
            prompt_ids, (completion_ids,) = _text_replies(tokenizer, row["prompt"], [row["completion"]])
            completion_mask = [1] * len(completion_ids)
        else:
            ensure_chat_template(tokenizer)
            prompt_ids, (completion_ids, completion_mask) = _conversation_replies(
                tokenizer, _as_messages(row["prompt"], "user"), _as_messages(row["completion"], "assistant")
            )
        replies = [(completion_ids, completion_mask, bool(row["label"]))]
    else:
        pair = tokenize_preference(row, fmt, tokenizer, 1 << 30)
        if pair is None:
            return []
        prompt_length = pair["prompt_length"]
        prompt_ids = pair["chosen_input_ids"][:prompt_length]
        replies = [
            (pair[f"{side}_input_ids"][prompt_length:], pair[f"{side}_loss_mask"][prompt_length:], side == "chosen")
            for side in ("chosen", "rejected")
        ]
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    reply_room = max_length - len(prompt_ids)
    if reply_room <= 0:
        return []
    return [
        {"prompt_ids": prompt_ids, "completion_ids": ids[:reply_room], "completion_mask": mask[:reply_room],
         "label": label}
        for ids, mask, label in replies
        if any(mask[:reply_room])
    ]


def tokenize_prompt(
    row: dict[str, Any],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """``{"prompt_input_ids", "prompt"}``: the ids (generation prompt appended, cut from the left to
    ``max_prompt_length``) and the prompt turns they render (the whole prompt, uncut), plus
    ``"reference"``, the text of the completion or chosen answer, when the row has one."""
    prompt, reference = prompt_and_reference(row, fmt)
    if is_text_row(row, fmt):
        prompt_ids = _text_ids(tokenizer, row["prompt"])
    else:
        ensure_chat_template(tokenizer)
        prompt_ids = render_prompt(tokenizer, prompt)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
    features: dict[str, Any] = {"prompt_input_ids": prompt_ids, "prompt": prompt}
    if reference is not None:
        features["reference"] = reference
    return features


def tokenize_dataset(
    dataset: Iterable[dict[str, Any]],
    fmt: Format,
    kind: Kind,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: Truncation = "right",
) -> tuple[list[dict[str, Any]], int]:
    """Tokenize every row (of a ``datasets.Dataset`` or a list) for ``kind``; returns the features and how
    many rows were dropped.

    For ``kind="prompt"`` prompts are cut to ``max_prompt_length``, or to ``max_length`` if that is unset.
    For ``kind="unpaired"`` a preference row gives two features and counts as dropped only when it gives none.
    """
    features: list[dict[str, Any]] = []
    dropped = 0
    for row in dataset:
        if kind == "sft":
            tokenized = tokenize_sft(row, fmt, tokenizer, max_length, truncation)
        elif kind == "preference":
            tokenized = tokenize_preference(row, fmt, tokenizer, max_length, max_prompt_length)
        elif kind == "prompt":
            tokenized = tokenize_prompt(row, fmt, tokenizer, max_prompt_length or max_length)
        elif kind == "unpaired":
            unpaired = tokenize_unpaired(row, fmt, tokenizer, max_length, max_prompt_length)
            features.extend(unpaired)
            dropped += not unpaired
            continue
        else:
            raise ValueError(
                f"unknown dataset kind {kind!r}; expected one of 'sft', 'preference', 'prompt', 'unpaired'"
            )
        if tokenized is None:
            dropped += 1
        else:
            features.append(tokenized)
    return features, dropped
