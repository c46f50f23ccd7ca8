"""The built-in parity task: disjoint splits, the designed mistake rates, and the exact-answer reward."""

from __future__ import annotations

import json

import pytest

from align import task


@pytest.fixture(scope="module")
def splits():
    return task.build_splits()


def prompt_of(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else text(row["prompt"])


def text(turns: list[dict]) -> str:
    """The content of a one-turn list (every built-in row is conversational)."""
    (turn,) = turns
    return turn["content"]


def test_split_sizes_and_disjoint_numbers(splits):
    splits = dict(splits)
    derived = {name: splits.pop(name) for name in task.DERIVED_SPLITS}
    assert {name: len(rows) for name, rows in splits.items()} == task.SPLIT_SIZES
    # eval_tell is exactly the tell-family half of eval.
    assert derived["eval_tell"] == [r for r in splits["eval"] if prompt_of(r).startswith(("Tell", "Say"))]
    assert len(derived["eval_tell"]) == task.SPLIT_SIZES["eval"] // 2
    numbers = {name: {int(task._NUMBER_PATTERN.search(prompt_of(r)).group()) for r in rows}
               for name, rows in splits.items()}
    names = list(numbers)
    for i, a in enumerate(names):
        assert len(numbers[a]) == task.SPLIT_SIZES[a], "numbers are unique within a split"
        for b in names[i + 1 :]:
            assert not numbers[a] & numbers[b], f"{a} and {b} share numbers"


def test_sft_mistakes_follow_the_family_rates(splits):
    wrong = {family: [0, 0] for family in task.FAMILIES}
    for row in splits["sft"]:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        family = "tell" if prompt.startswith(("Tell", "Say")) else "ask"
        wrong[family][0] += answer != task.answer_of(prompt)
        wrong[family][1] += 1
    assert wrong["ask"][1] == wrong["tell"][1] == 256
    assert wrong["ask"][0] / 256 == pytest.approx(task.MISTAKE_RATE["ask"], abs=0.05)
    assert wrong["tell"][0] / 256 == pytest.approx(task.MISTAKE_RATE["tell"], abs=0.05)


def test_preference_pairs_put_the_right_parity_first(splits):
    for row in splits["prefs"] + splits["prefs_eval"]:
        assert text(row["chosen"]) == task.answer_of(prompt_of(row))
        assert {text(row["chosen"]), text(row["rejected"])} == {"even", "odd"}
        assert (row["prompt"][0]["role"], row["chosen"][0]["role"]) == ("user", "assistant")


def test_answers_and_reward():
    assert task.answer_of("Is 4719 even or odd?") == "odd"
    assert task.answer_of("Tell me whether 0 is even or odd.") == "even"
    assert task.exact_answer_reward("Say if 12 is even or odd.", " even\n") == 1.0
    assert task.exact_answer_reward("Say if 12 is even or odd.", "even.") == 0.0
    assert task.exact_answer_reward("Is 7 even or odd?", "even") == 0.0
    with pytest.raises(ValueError, match="not a parity prompt"):
        task.answer_of("What is the capital of France?")


def test_materialize_writes_each_split_once(tmp_path):
    path = task.materialize("builtin:parity/eval", tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == task.build_splits()["eval"]
    assert task.materialize("builtin:parity/eval", tmp_path) == path
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        task.materialize("builtin:parity/nope", tmp_path)
