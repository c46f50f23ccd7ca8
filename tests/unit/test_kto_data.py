"""KTO's rows: TRL's unpaired layout (prompt, completion, label) or preference pairs split in two, each row
paired with another row's completion for the KL estimate, and the metrics a step logs."""

import math

import datasets
import pytest
import torch
from data_helpers import build_tokenizer

from align.data import (
    DataError,
    detect_format,
    load_rows,
    tokenize_dataset,
    tokenize_preference,
    tokenize_sft,
    validate_rows,
)
from align.data.tokenize import tokenize_prompt, tokenize_unpaired
from align.losses.kto import kto_loss
from align.stages.kto import kl_partners, kto_pairs, row_sums, step_means

PAIR = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."}
TEXT_ROW = {"prompt": "What is the capital of France?", "completion": "Paris.", "label": True}
CHAT_ROW = {"prompt": [{"role": "user", "content": "Is 7 even or odd?"}],
            "completion": [{"role": "assistant", "content": "odd"}], "label": False}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize(("rows", "expected"), [
    ([TEXT_ROW], "unpaired"), ([CHAT_ROW], "unpaired"), ([PAIR], "preference"),
])
def test_an_unpaired_stage_reads_trl_kto_rows_or_pairs(rows, expected):
    dataset = datasets.Dataset.from_list(rows)
    assert detect_format(dataset, "unpaired", "kto.jsonl") == expected
    validate_rows(dataset, expected, "kto.jsonl", kind="unpaired")


def test_a_missing_label_names_the_column_and_the_layouts():
    with pytest.raises(DataError) as caught:
        detect_format(datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]), "unpaired", "kto.jsonl")
    assert caught.value.column == "label"
    assert "{'prompt', 'completion', 'label'}" in str(caught.value)


@pytest.mark.parametrize(("label", "problem"), [("yes", "got a string"), (None, "got null"), (1, "got int 1")])
def test_a_label_that_is_not_true_or_false_is_refused_at_its_row(tmp_path, label, problem):
    path = write_jsonl(tmp_path / "kto.jsonl", [TEXT_ROW, {**TEXT_ROW, "label": label}])
    rows = load_rows(path)
    with pytest.raises(DataError) as caught:
        validate_rows(rows, detect_format(rows, "unpaired", path), path, kind="unpaired")
    assert (caught.value.row, caught.value.column) == (1, "label")
    assert problem in str(caught.value) and "true for a desirable completion" in str(caught.value)


def test_a_text_row_is_its_prompt_then_its_completion_as_trl_encodes_them(tokenizer):
    (row,) = tokenize_unpaired(TEXT_ROW, "unpaired", tokenizer, max_length=512)
    sft = tokenize_sft(TEXT_ROW, "prompt_completion", tokenizer, max_length=512)
    assert row["prompt_ids"] + row["completion_ids"] == sft["input_ids"]
    assert [0] * len(row["prompt_ids"]) + row["completion_mask"] == sft["loss_mask"]
    assert row["label"] is True


def test_a_conversational_row_renders_like_its_sft_conversation(tokenizer):
    (row,) = tokenize_unpaired(CHAT_ROW, "unpaired", tokenizer, max_length=512)
    sft = tokenize_sft({"messages": CHAT_ROW["prompt"] + CHAT_ROW["completion"]}, "messages", tokenizer, 512)
    assert row["prompt_ids"] + row["completion_ids"] == sft["input_ids"]
    assert [0] * len(row["prompt_ids"]) + row["completion_mask"] == sft["loss_mask"]
    assert row["prompt_ids"] == tokenize_prompt(CHAT_ROW, "unpaired", tokenizer)["prompt_input_ids"]
    assert row["label"] is False


def test_a_pair_gives_a_desirable_and_an_undesirable_row_on_one_prompt(tokenizer):
    desirable, undesirable = tokenize_unpaired(PAIR, "preference", tokenizer, max_length=512)
    pair = tokenize_preference(PAIR, "preference", tokenizer, max_length=512)
    assert (desirable["label"], undesirable["label"]) == (True, False)
    assert desirable["prompt_ids"] == undesirable["prompt_ids"] == pair["chosen_input_ids"][: pair["prompt_length"]]
    assert desirable["prompt_ids"] + desirable["completion_ids"] == pair["chosen_input_ids"]
    assert undesirable["prompt_ids"] + undesirable["completion_ids"] == pair["rejected_input_ids"]
    rows, dropped = tokenize_dataset([PAIR, PAIR], "preference", "unpaired", tokenizer, 512)
    assert (len(rows), dropped) == (4, 0) and [r["label"] for r in rows] == [True, False, True, False]


def test_truncation_cuts_the_prompt_left_then_the_completion_right(tokenizer):
    (full,) = tokenize_unpaired(TEXT_ROW, "unpaired", tokenizer, max_length=512)
    prompt_length = len(full["prompt_ids"])
    (cut,) = tokenize_unpaired(TEXT_ROW, "unpaired", tokenizer, max_length=prompt_length + 1,
                               max_prompt_length=prompt_length - 2)
    assert cut["prompt_ids"] == full["prompt_ids"][2:]
    assert cut["completion_ids"] == full["completion_ids"][:3]
    assert tokenize_unpaired(TEXT_ROW, "unpaired", tokenizer, max_length=prompt_length) == []
    _, dropped = tokenize_dataset([TEXT_ROW], "unpaired", "unpaired", tokenizer, prompt_length)
    assert dropped == 1


def test_only_a_desirable_completion_is_a_reference_answer(tokenizer):
    assert tokenize_prompt(TEXT_ROW, "unpaired", tokenizer)["reference"] == "Paris."
    assert "reference" not in tokenize_prompt({**TEXT_ROW, "label": False}, "unpaired", tokenizer)


@pytest.mark.parametrize("rows", [2, 3, 10, 97])
def test_every_row_takes_another_rows_completion_and_each_completion_is_taken_once(rows):
    partners = kl_partners(rows, seed=5)
    assert sorted(partners) == list(range(rows))
    assert all(partner != row for row, partner in enumerate(partners))
    assert kl_partners(rows, seed=5) == partners


def test_the_partners_are_a_seeded_shuffle_rotated_by_one():
    """Seed 0 shuffles [0, 1, 2, 3] to [2, 0, 1, 3] (random.Random(0).shuffle); each row in that order takes
    the completion of the one before it, the first the last's: 2<-3, 0<-2, 1<-0, 3<-1."""
    order = list(range(4))
    __import__("random").Random(0).shuffle(order)
    assert order == [2, 0, 1, 3]
    assert kl_partners(4, seed=0) == [2, 0, 3, 1]


def test_a_row_is_laid_out_as_a_pair_of_its_completion_and_its_partners():
    rows = [
        {"prompt_ids": [1, 2], "completion_ids": [3, 4], "completion_mask": [1, 1], "label": True},
        {"prompt_ids": [5, 6, 7], "completion_ids": [8, 9, 10], "completion_mask": [1, 1, 1], "label": False},
    ]
    first, second = kto_pairs(rows, seed=0, max_length=5)
    assert first == {"chosen_input_ids": [1, 2, 3, 4], "chosen_loss_mask": [0, 0, 1, 1],
                     "rejected_input_ids": [1, 2, 8, 9, 10], "rejected_loss_mask": [0, 0, 1, 1, 1],
                     "prompt_length": 2, "label": True}
    # The partner's completion is cut to fit max_length after this row's prompt.
    assert second["rejected_input_ids"] == [5, 6, 7, 3, 4] and second["rejected_loss_mask"] == [0, 0, 0, 1, 1]
    assert second["label"] is False


def test_step_metrics_are_means_per_row_and_per_kind():
    """β = 0.5, log-ratios r = [2, -1, 1] (desirable, undesirable, undesirable), KL estimate 0.4 = z₀.
    Rewards β·r = [1, -0.5, 0.5]; against β·z₀ = 0.2 row 0 is above (right for a desirable row), row 1 below
    (right), row 2 above (wrong): accuracy 2/3. Losses: 1 - σ(0.5·1.6), 1 - σ(0.5·1.4), 1 - σ(0.5·(-0.6))."""
    policy = torch.tensor([2.0, -1.0, 1.0])
    desirable = torch.tensor([True, False, False])
    out = kto_loss(policy, torch.zeros(3), desirable, 0.4, beta=0.5)
    means = step_means(row_sums(out, desirable, beta=0.5))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [1 - sigmoid(0.8), 1 - sigmoid(0.7), 1 - sigmoid(-0.3)]
    assert means["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert means["kl"] == pytest.approx(0.4, rel=1e-6)
    assert means["rewards_desirable"] == pytest.approx(1.0)
    assert means["rewards_undesirable"] == pytest.approx(0.0)
    assert means["rewards_accuracy"] == pytest.approx(2 / 3)
    only_desirable = step_means(row_sums(kto_loss(policy[:1], torch.zeros(1), desirable[:1], 0.0, beta=0.5),
                                         desirable[:1], beta=0.5), "eval_")
    assert "eval_rewards_undesirable" not in only_desirable and only_desirable["eval_rewards_accuracy"] == 1.0
