"""Loading, validating, tokenizing and collating datasets on a tiny in-memory tokenizer."""

import json

import datasets
import pytest
import torch
from data_helpers import build_tokenizer

from align.data import (
    DataError,
    collate_preference,
    collate_prompts,
    collate_sft,
    detect_format,
    file_fingerprint,
    load_rows,
    pad_sequences,
    tokenize_dataset,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
    validate_rows,
)
from align.data.templates import DEFAULT_CHAT_TEMPLATE, END_OF_TURN
from align.data.tokenize import ensure_chat_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four, thanks."},
    {"role": "user", "content": "And the sky?"},
    {"role": "assistant", "content": "The sky is blue today."},
]
PREFERENCE_ROW = {
    "prompt": "What is the capital of France?",
    "chosen": "Paris.",
    "rejected": "The teacher reads a short poem again and again.",
}
IMPLICIT_PROMPT_ROW = {"chosen": CONVERSATION[1:3], "rejected": CONVERSATION[1:2] + CONVERSATION[4:]}
MESSAGES_ROW = {"messages": CONVERSATION}
PROMPT_COMPLETION_ROW = {"prompt": "a", "completion": "b"}


@pytest.fixture(scope="module", params=[False, True], ids=["pad", "pad_is_eos"])
def tokenizer(request):
    return build_tokenizer(pad_is_eos=request.param)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return build_tokenizer()


def masked_text(tokenizer, input_ids, loss_mask) -> str:
    return tokenizer.decode([token for token, keep in zip(input_ids, loss_mask) if keep])


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# Loading


def test_every_file_format_loads_the_same_rows(tmp_path):
    rows = [{"prompt": "Hi there", "completion": "Hello!"}, {"prompt": "Count", "completion": "One two"}]
    reference = datasets.Dataset.from_list(rows)
    paths = [write_jsonl(tmp_path / "rows.jsonl", rows)]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    paths.append(str(tmp_path / "list.json"))
    paths.append(write_jsonl(tmp_path / "lines.json", rows))
    reference.to_parquet(str(tmp_path / "rows.parquet"))
    paths.append(str(tmp_path / "rows.parquet"))
    reference.to_csv(str(tmp_path / "rows.csv"), index=False)
    paths.append(str(tmp_path / "rows.csv"))
    reference.save_to_disk(str(tmp_path / "saved"))
    paths.append(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": reference, "test": reference.select([0])}).save_to_disk(
        str(tmp_path / "dict")
    )
    paths.append(str(tmp_path / "dict"))

    for path in paths:
        assert load_rows(path).to_list() == rows, path


def test_conversational_jsonl_keeps_message_lists(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    assert load_rows(path)[0]["messages"] == CONVERSATION


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.jsonl") as caught:
        load_rows(str(tmp_path / "nowhere.jsonl"))
    assert caught.value.row is None and caught.value.column is None


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("rows.txt", "hello", "unsupported file type '.txt'"),
        ("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', "cannot be read as jsonl"),
    ],
)
def test_unreadable_files_raise_data_error(tmp_path, name, content, problem):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=problem):
        load_rows(str(tmp_path / name))


def test_folder_that_is_not_a_saved_dataset_is_rejected(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(str(tmp_path))


# Formats


@pytest.mark.parametrize(
    ("rows", "kind", "expected"),
    [
        ([MESSAGES_ROW], "sft", "messages"),
        ([{"prompt": "a", "completion": "b"}], "sft", "prompt_completion"),
        ([PREFERENCE_ROW], "preference", "preference"),
        (
            [{"prompt": CONVERSATION[:2], "chosen": [CONVERSATION[2]], "rejected": [CONVERSATION[4]]}],
            "preference",
            "preference_conversational",
        ),
        ([IMPLICIT_PROMPT_ROW], "preference", "preference_conversational"),
        ([{"prompt": "a"}], "prompt", "prompt"),
        ([{"prompt": "a", "completion": "b"}], "prompt", "prompt_completion"),
        ([PREFERENCE_ROW], "prompt", "preference"),
        ([MESSAGES_ROW], "prompt", "messages"),
    ],
)
def test_detect_format_for_each_trl_shape(rows, kind, expected):
    dataset = datasets.Dataset.from_list(rows)
    fmt = detect_format(dataset, kind, "data.jsonl")
    assert fmt == expected
    validate_rows(dataset, fmt, "data.jsonl", kind=kind)


@pytest.mark.parametrize(
    ("rows", "kind", "column"),
    [
        ([{"text": "a"}], "sft", "messages"),
        ([{"prompt": "a"}], "sft", "completion"),
        ([{"prompt": "a", "chosen": "b"}], "preference", "rejected"),
        ([{"chosen": "b", "rejected": "c"}], "preference", "prompt"),
        ([{"text": "a"}], "prompt", "prompt"),
    ],
)
def test_missing_columns_name_the_column_and_accepted_sets(rows, kind, column):
    with pytest.raises(DataError) as caught:
        detect_format(datasets.Dataset.from_list(rows), kind, "data/prefs.jsonl")
    assert caught.value.column == column
    message = str(caught.value)
    assert f"column {column!r}" in message and "data/prefs.jsonl" in message and "needs columns" in message


@pytest.mark.parametrize(
    ("good_row", "bad_row", "kind", "column", "problem"),
    [
        (PREFERENCE_ROW, {**PREFERENCE_ROW, "chosen": None}, "preference", "chosen", "got null"),
        (
            PREFERENCE_ROW,
            {**PREFERENCE_ROW, "rejected": "  "},
            "preference",
            "rejected",
            "got an empty string",
        ),
        (PREFERENCE_ROW, {**PREFERENCE_ROW, "chosen": CONVERSATION[2:3]}, "preference", "chosen", "got list"),
        (MESSAGES_ROW, {"messages": [{"role": "bot", "content": "hi"}]}, "sft", "messages", "role 'bot'"),
        (MESSAGES_ROW, {"messages": [{"role": "user", "content": 5}]}, "sft", "messages", "got int 5"),
        (MESSAGES_ROW, {"messages": CONVERSATION[:2]}, "sft", "messages", "last message is from 'user'"),
        (PROMPT_COMPLETION_ROW, {"prompt": "a", "completion": None}, "sft", "completion", "got null"),
        (PROMPT_COMPLETION_ROW, {"prompt": ["a"], "completion": "b"}, "sft", "prompt", "message 0"),
        (
            IMPLICIT_PROMPT_ROW,
            {"chosen": CONVERSATION[2:3], "rejected": CONVERSATION[4:]},
            "preference",
            "chosen",
            "no prompt",
        ),
    ],
)
def test_bad_rows_name_file_row_and_column(tmp_path, good_row, bad_row, kind, column, problem):
    path = write_jsonl(tmp_path / "prefs.jsonl", [good_row, good_row, bad_row])
    dataset = load_rows(path)
    with pytest.raises(DataError) as caught:
        validate_rows(dataset, detect_format(dataset, kind, path), path, kind=kind)
    error = caught.value
    assert (error.path, error.row, error.column) == (path, 2, column)
    assert f"prefs.jsonl row 2 column {column!r}: " in str(error)
    assert problem in str(error)


# SFT tokenization


def test_sft_loss_mask_is_exactly_the_assistant_replies_and_eos(tokenizer):
    tokenized = tokenize_sft({"messages": CONVERSATION}, "messages", tokenizer, max_length=512)
    assert len(tokenized["input_ids"]) == len(tokenized["loss_mask"])
    assert (
        masked_text(tokenizer, **tokenized)
        == f"Four, thanks.{END_OF_TURN}The sky is blue today.{END_OF_TURN}"
    )
    assert tokenized["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenized["loss_mask"][-1] == 1


def test_prompt_completion_messages_become_one_conversation(tokenizer):
    prompt = [{"role": "user", "content": "What is two plus two?"}]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "Four."}]}
    tokenized = tokenize_sft(row, "prompt_completion", tokenizer, max_length=512)
    conversation = prompt + row["completion"]
    assert tokenized == tokenize_sft({"messages": conversation}, "messages", tokenizer, max_length=512)
    assert masked_text(tokenizer, **tokenized) == f"Four.{END_OF_TURN}"


def test_text_prompt_completion_is_plain_text_plus_eos(tokenizer):
    row = {"prompt": "What is two plus two?", "completion": " Four."}
    tokenized = tokenize_sft(row, "prompt_completion", tokenizer, max_length=512)
    assert tokenizer.decode(tokenized["input_ids"]) == f"What is two plus two? Four.{END_OF_TURN}"
    assert masked_text(tokenizer, **tokenized) == f" Four.{END_OF_TURN}"


def test_eos_keeps_its_loss_when_pad_is_eos():
    tokenizer = build_tokenizer(pad_is_eos=True)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    short = tokenize_sft({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion", tokenizer, 512)
    long = tokenize_sft({"messages": CONVERSATION}, "messages", tokenizer, 512)
    batch = collate_sft([short, long], tokenizer.pad_token_id)
    length = len(short["input_ids"])
    assert batch["input_ids"][0, length - 1] == tokenizer.eos_token_id
    assert batch["loss_mask"][0, length - 1] == 1
    assert batch["input_ids"][0, length:].eq(tokenizer.eos_token_id).all()
    assert batch["loss_mask"][0, length:].eq(0).all() and batch["attention_mask"][0, length:].eq(0).all()


def test_truncation_policies(plain_tokenizer):
    row = {"messages": CONVERSATION}
    full = tokenize_sft(row, "messages", plain_tokenizer, max_length=512)
    reply_length = len(plain_tokenizer("The sky is blue today.")["input_ids"]) + 1
    max_length = reply_length + 6

    right = tokenize_sft(row, "messages", plain_tokenizer, max_length=max_length, truncation="right")
    assert right is None  # the first max_length tokens are system and user text only
    right = tokenize_sft(row, "messages", plain_tokenizer, max_length=len(full["input_ids"]) - 2)
    assert right["input_ids"] == full["input_ids"][:-2]
    assert masked_text(plain_tokenizer, **right).startswith("Four, thanks.")

    left = tokenize_sft(row, "messages", plain_tokenizer, max_length=max_length, truncation="left")
    assert left["input_ids"] == full["input_ids"][-max_length:]
    assert masked_text(plain_tokenizer, **left) == f"The sky is blue today.{END_OF_TURN}"

    too_short = tokenize_sft(row, "messages", plain_tokenizer, max_length=3, truncation="left")
    assert masked_text(plain_tokenizer, **too_short) == plain_tokenizer.decode(
        full["input_ids"][-reply_length:][:3]
    )

    assert tokenize_sft(row, "messages", plain_tokenizer, max_length=max_length, truncation="drop") is None
    kept = tokenize_sft(
        row, "messages", plain_tokenizer, max_length=len(full["input_ids"]), truncation="drop"
    )
    assert kept == full


def test_tokenize_dataset_counts_dropped_rows(plain_tokenizer):
    dataset = datasets.Dataset.from_list(
        [{"prompt": "Hi", "completion": "Hello!"}, {"prompt": "Count " * 40, "completion": "One."}]
    )
    features, dropped = tokenize_dataset(
        dataset, "prompt_completion", "sft", plain_tokenizer, max_length=32, truncation="drop"
    )
    assert len(features) == 1 and dropped == 1


def test_default_template_is_set_when_missing():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE


# Preference tokenization


PREFERENCE_SHAPES = [
    {
        "prompt": [{"role": "user", "content": PREFERENCE_ROW["prompt"]}],
        "chosen": [{"role": "assistant", "content": PREFERENCE_ROW["chosen"]}],
        "rejected": [{"role": "assistant", "content": PREFERENCE_ROW["rejected"]}],
    },
    {
        "chosen": [
            {"role": "user", "content": PREFERENCE_ROW["prompt"]},
            {"role": "assistant", "content": PREFERENCE_ROW["chosen"]},
        ],
        "rejected": [
            {"role": "user", "content": PREFERENCE_ROW["prompt"]},
            {"role": "assistant", "content": PREFERENCE_ROW["rejected"]},
        ],
    },
]


@pytest.mark.parametrize("row", PREFERENCE_SHAPES, ids=["explicit_prompt", "implicit_prompt"])
def test_preference_shares_the_prompt_and_masks_the_replies(tokenizer, row):
    tokenized = tokenize_preference(row, "preference_conversational", tokenizer, max_length=512)
    prompt_length = tokenized["prompt_length"]
    assert tokenized["chosen_input_ids"][:prompt_length] == tokenized["rejected_input_ids"][:prompt_length]
    assert (
        tokenized["chosen_input_ids"][:prompt_length]
        == tokenize_prompt(PREFERENCE_SHAPES[0], "preference_conversational", tokenizer)["prompt_input_ids"]
    )
    for side in ("chosen", "rejected"):
        assert masked_text(tokenizer, tokenized[f"{side}_input_ids"], tokenized[f"{side}_loss_mask"]) == (
            PREFERENCE_ROW[side] + END_OF_TURN
        )
        assert not any(tokenized[f"{side}_loss_mask"][:prompt_length])
    # The shared prompt followed by the chosen reply is exactly the rendered conversation.
    conversation = [
        {"role": "user", "content": PREFERENCE_ROW["prompt"]},
        {"role": "assistant", "content": PREFERENCE_ROW["chosen"]},
    ]
    sft = tokenize_sft({"messages": conversation}, "messages", tokenizer, max_length=512)
    assert tokenized["chosen_input_ids"] == sft["input_ids"]


def test_text_preference_rows_use_no_template(tokenizer):
    tokenized = tokenize_preference(PREFERENCE_ROW, "preference", tokenizer, max_length=512)
    prompt_length = tokenized["prompt_length"]
    assert tokenized["chosen_input_ids"][:prompt_length] == tokenizer(PREFERENCE_ROW["prompt"])["input_ids"]
    for side in ("chosen", "rejected"):
        assert tokenizer.decode(tokenized[f"{side}_input_ids"]) == (
            PREFERENCE_ROW["prompt"] + PREFERENCE_ROW[side] + END_OF_TURN
        )
        assert masked_text(tokenizer, tokenized[f"{side}_input_ids"], tokenized[f"{side}_loss_mask"]) == (
            PREFERENCE_ROW[side] + END_OF_TURN
        )


def test_preference_truncation_cuts_prompt_left_then_replies_right(plain_tokenizer):
    full = tokenize_preference(PREFERENCE_ROW, "preference", plain_tokenizer, max_length=512)
    cut = tokenize_preference(
        PREFERENCE_ROW, "preference", plain_tokenizer, max_length=12, max_prompt_length=6
    )
    assert cut["prompt_length"] == 6
    full_prompt = full["chosen_input_ids"][: full["prompt_length"]]
    assert cut["chosen_input_ids"][:6] == cut["rejected_input_ids"][:6] == full_prompt[-6:]
    for side in ("chosen", "rejected"):
        assert len(cut[f"{side}_input_ids"]) == len(cut[f"{side}_loss_mask"]) <= 12
        reply = full[f"{side}_input_ids"][full["prompt_length"] :]
        assert cut[f"{side}_input_ids"][6:] == reply[:6]
    assert tokenize_preference(PREFERENCE_ROW, "preference", plain_tokenizer, max_length=6) is None


# Prompts


def test_prompt_ends_with_generation_prompt_and_keeps_reference(plain_tokenizer):
    prompt = tokenize_prompt({"messages": CONVERSATION}, "messages", plain_tokenizer)
    assert plain_tokenizer.decode(prompt["prompt_input_ids"]).endswith("And the sky?<|end|><|assistant|>\n")
    assert prompt["reference"] == "The sky is blue today."
    assert "reference" not in tokenize_prompt({"prompt": "Hi"}, "prompt", plain_tokenizer)
    cut = tokenize_prompt({"messages": CONVERSATION}, "messages", plain_tokenizer, max_prompt_length=4)
    assert cut["prompt_input_ids"] == prompt["prompt_input_ids"][-4:]


# Collation


def test_pad_sequences_right_and_left():
    assert pad_sequences([[1, 2, 3], [4]], pad_value=0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_sequences([[1, 2, 3], [4]], pad_value=9, side="left").tolist() == [[1, 2, 3], [9, 9, 4]]
    assert pad_sequences([[1]], pad_value=0).dtype == torch.long


def test_collate_sft_shapes_and_padding():
    features = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": [8], "loss_mask": [1]}]
    batch = collate_sft(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_collate_preference_stacks_chosen_then_rejected():
    features = [
        {
            "chosen_input_ids": [1, 2, 3],
            "chosen_loss_mask": [0, 1, 1],
            "rejected_input_ids": [1, 4],
            "rejected_loss_mask": [0, 1],
            "prompt_length": 1,
        },
        {
            "chosen_input_ids": [5, 6],
            "chosen_loss_mask": [0, 1],
            "rejected_input_ids": [5, 7, 8, 9],
            "rejected_loss_mask": [0, 1, 1, 1],
            "prompt_length": 1,
        },
    ]
    batch = collate_preference(features, pad_id=0)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["loss_mask"].shape == (4, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [5, 6, 0, 0], [1, 4, 0, 0], [5, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]]


def test_collate_prompts_left_pads():
    batch = collate_prompts([{"prompt_input_ids": [1, 2, 3]}, {"prompt_input_ids": [4]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# Fingerprints


def test_fingerprint_changes_with_one_byte(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"prompt": "a"}\n' * 1000)
    before = file_fingerprint(str(data))
    assert before.startswith("sha256:") and len(before) == len("sha256:") + 64
    assert file_fingerprint(str(data)) == before
    data.write_bytes(b'{"prompt": "b"}\n' + b'{"prompt": "a"}\n' * 999)
    assert file_fingerprint(str(data)) != before


def test_folder_fingerprint_covers_bytes_and_names(tmp_path):
    folder = tmp_path / "saved"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.arrow").write_bytes(b"abc")
    (folder / "sub" / "b.json").write_bytes(b"{}")
    before = file_fingerprint(str(folder))
    (folder / "sub" / "b.json").write_bytes(b"[]")
    changed_bytes = file_fingerprint(str(folder))
    (folder / "sub" / "b.json").rename(folder / "sub" / "c.json")
    renamed = file_fingerprint(str(folder))
    assert len({before, changed_bytes, renamed}) == 3
    with pytest.raises(FileNotFoundError):
        file_fingerprint(str(tmp_path / "missing"))
