"""Evaluation gates: the decision on hand-worked numbers, and the spec checks that refuse a gate that could
never be decided."""

from __future__ import annotations

import math

import pytest

from align.gates import check_gate, starting_value
from align.spec import FINAL_METRICS, GateSpec, SpecError, parse_spec
from align.stages import dpo, reference_free, rm


def gate(**fields) -> GateSpec:
    return GateSpec(metric="eval_rewards_accuracy", **fields)


@pytest.mark.parametrize(("fields", "value", "baseline", "passed", "reason"), [
    ({"min": 0.6}, 0.75, None, True, "eval_rewards_accuracy 0.75 >= min 0.6"),
    ({"min": 0.6}, 0.55, None, False, "eval_rewards_accuracy 0.55 < min 0.6"),
    ({"min": 0.6}, 0.6, None, True, "eval_rewards_accuracy 0.6 >= min 0.6"),
    ({"max": 0.5}, 0.75, None, False, "eval_rewards_accuracy 0.75 > max 0.5"),
    # 0.75 - 0.5 = +0.25 beats a required +0.1; 0.55 - 0.5 = +0.05 does not.
    ({"min_delta_vs_parent": 0.1}, 0.75, 0.5, True,
     "eval_rewards_accuracy 0.75 vs the parent's 0.5: change +0.25 >= min_delta_vs_parent +0.1"),
    ({"min_delta_vs_parent": 0.1}, 0.55, 0.5, False,
     "eval_rewards_accuracy 0.55 vs the parent's 0.5: change +0.05 < min_delta_vs_parent +0.1"),
    # "not worse": an unchanged metric passes a zero delta.
    ({"min_delta_vs_parent": 0.0}, 0.5, 0.5, True,
     "eval_rewards_accuracy 0.5 vs the parent's 0.5: change +0 >= min_delta_vs_parent +0"),
    # Every condition must hold; the reason names only the ones that failed.
    ({"min": 0.6, "min_delta_vs_parent": 0.0}, 0.7, 0.8, False,
     "eval_rewards_accuracy 0.7 vs the parent's 0.8: change -0.1 < min_delta_vs_parent +0"),
    ({"min_delta_vs_parent": 0.0}, 0.7, None, False,
     "the parent policy's eval_rewards_accuracy is unknown, so min_delta_vs_parent cannot be checked"),
    ({"min": 0.0}, None, None, False, "eval_rewards_accuracy is missing: the stage never measured it"),
    ({"max": 1.0}, math.nan, None, False, "eval_rewards_accuracy is nan, not a number to compare"),
])
def test_check_gate(fields, value, baseline, passed, reason):
    result = check_gate(gate(**fields), value, baseline)
    assert (result.passed, result.reason) == (passed, reason)
    assert result.value == (None if value is None or math.isnan(value) else value)


def test_a_non_finite_baseline_counts_as_none():
    result = check_gate(gate(min_delta_vs_parent=0.0), 0.5, math.inf)
    assert not result.passed and result.baseline is None


def test_starting_value_is_the_step_0_record():
    records = [{"step": 0, "eval_loss": 2.0}, {"step": 1, "loss": 1.5}, {"step": 4, "eval_loss": 1.0}]
    assert starting_value(records, "eval_loss") == 2.0
    assert starting_value(records, "eval_exact_match") is None
    assert starting_value(records[1:], "eval_loss") is None


def test_final_metrics_hold_what_each_stage_logs():
    assert {*dpo.METRIC_KEYS, "eval_loss", "eval_rewards_accuracy", "eval_rewards_margin"} <= set(FINAL_METRICS["dpo"])
    assert {*rm.METRIC_KEYS, "eval_loss", "eval_accuracy", "eval_margin"} <= set(FINAL_METRICS["rm"])
    for type_, keys in reference_free.METRIC_KEYS.items():
        assert {*keys, *(f"eval_{key}" for key in keys)} <= set(FINAL_METRICS[type_])


PAIRS = {"path": "prefs.jsonl", "eval_fraction": 0.1}


def errors(stages: list[dict], **job) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "j", "base_model": "builtin:tiny", "stages": stages, **job})
    return dict(info.value.errors)


@pytest.mark.parametrize(("stage", "field", "message"), [
    ({"type": "dpo", "data": PAIRS, "gate": {"metric": "accuracy", "min": 0.5}}, "stages[0].gate.metric",
     "a dpo stage does not report 'accuracy'; use one of loss, dpo_loss, nll_loss, rewards_chosen, "
     "rewards_rejected, rewards_margin, rewards_accuracy, eval_loss, eval_dpo_loss, eval_nll_loss, "
     "eval_rewards_accuracy, eval_rewards_margin, eval_logp_accuracy, eval_exact_match, eval_reward_mean, "
     "eval_win_rate"),
    ({"type": "dpo", "data": {"path": "prefs.jsonl"}, "gate": {"metric": "eval_rewards_accuracy", "min": 0.5}},
     "stages[0].gate.metric", "'eval_rewards_accuracy' is measured on held-out data and this stage has none; "
     "set data.eval_path or data.eval_fraction"),
    ({"type": "dpo", "data": PAIRS, "gate": {"metric": "eval_exact_match", "min": 0.5}}, "stages[0].gate.metric",
     "'eval_exact_match' is only measured with eval_exact_match: true; set it or gate on another metric"),
    ({"type": "dpo", "data": PAIRS, "gate": {"metric": "eval_loss"}}, "stages[0].gate",
     "names metric 'eval_loss' but no condition; set min, max or min_delta_vs_parent"),
    ({"type": "dpo", "data": PAIRS, "eval_reward": "exact_answer", "max_length": 64, "max_new_tokens": 8,
      "gate": {}}, "stages[0].gate", "sets no condition; set min, max or min_delta_vs_parent"),
    ({"type": "dpo", "data": PAIRS, "gate": {"min": 0.5}}, "stages[0].gate.metric",
     "a dpo stage that does not score its replies to held-out prompts has no default metric (eval_win_rate); "
     "name one or set eval_reward (model or exact_answer)"),
    ({"type": "sft", "data": PAIRS, "gate": {"min": 0.5}}, "stages[0].gate.metric",
     "a sft stage that does not score its replies to held-out prompts has no default metric (eval_win_rate); "
     "name one"),
    ({"type": "simpo", "data": PAIRS, "gate": {"metric": "eval_win_rate", "min": 0.5}}, "stages[0].gate.metric",
     "'eval_win_rate' is only measured with eval_reward set; set eval_reward (model or exact_answer) or gate on "
     "another metric"),
    ({"type": "dpo", "data": PAIRS, "gate": {"metric": "eval_loss", "min": 2, "max": 1}}, "stages[0].gate.min",
     "2 is above max (1), so no value can pass; lower min or raise max"),
    ({"type": "sft", "data": PAIRS, "gate": {"metric": "eval_loss", "min_delta_vs_parent": -0.1}},
     "stages[0].gate.min_delta_vs_parent",
     "this sft stage starts from the base model, which has no 'eval_loss' to compare with; use min or max"),
    ({"type": "rm", "data": PAIRS, "gate": {"metric": "eval_accuracy", "min_delta_vs_parent": 0.0}},
     "stages[0].gate.min_delta_vs_parent",
     "an rm stage's parent is a policy, which reports no reward-model metrics; use min or max"),
])
def test_a_gate_that_cannot_be_decided_is_refused(stage, field, message):
    assert errors([stage]) == {field: message}


@pytest.mark.parametrize("stage", [
    {"type": "dpo", "data": PAIRS, "eval_reward": "exact_answer", "max_length": 64, "max_new_tokens": 8},
    {"type": "orpo", "data": PAIRS, "eval_reward": "model", "reward_model": "artifact:rm.rm-v1-0123456789ab"},
    {"type": "grpo", "data": PAIRS, "reward": "exact_answer"},
    {"type": "ppo", "data": PAIRS, "reward": "exact_answer", "critic_init": "policy"},
], ids=["dpo", "orpo", "grpo", "ppo"])
def test_a_gate_without_a_metric_gates_on_the_win_rate_of_a_stage_that_scores_its_replies(stage):
    job = parse_spec({"name": "j", "base_model": "builtin:tiny",
                      "stages": [{**stage, "gate": {"min_delta_vs_parent": 0.05}}]})
    assert job.stages[0].gate.metric == "eval_win_rate"
    assert parse_spec(job.model_dump(mode="json")) == job
    assert {"eval_reward_mean", "eval_win_rate"} <= set(FINAL_METRICS[stage["type"]])


def test_a_gate_changes_the_spec_hash():
    stage = {"type": "dpo", "data": PAIRS}
    plain = parse_spec({"name": "j", "base_model": "builtin:tiny", "stages": [stage]})
    gated = parse_spec({"name": "j", "base_model": "builtin:tiny",
                        "stages": [{**stage, "gate": {"metric": "eval_loss", "max": 1.0}}]})
    assert plain.hash() != gated.hash()
    assert plain.hash() == parse_spec({"name": "j", "base_model": "builtin:tiny",
                                       "stages": [{**stage, "gate": None}]}).hash()


def test_an_sft_gate_compares_with_an_earlier_sft_but_not_with_dpo():
    sft = {"type": "sft", "data": PAIRS, "gate": {"metric": "eval_loss", "min_delta_vs_parent": -0.1}}
    dpo_stage = {"type": "dpo", "data": PAIRS}
    job = parse_spec({"name": "j", "base_model": "builtin:tiny", "stages": [{**sft, "gate": None}, sft]})
    assert job.stages[1].gate.min_delta_vs_parent == -0.1
    assert errors([dpo_stage, sft]) == {
        "stages[1].gate.min_delta_vs_parent": "this sft stage continues a dpo stage, whose 'eval_loss' measures "
                                              "something else; use min or max"}
    # After a base_model: artifact:<id> the parent's manifest is read when the stage publishes.
    job = parse_spec({"name": "j", "base_model": "artifact:a.sft-v1-000000000000", "stages": [sft]})
    assert job.stages[0].gate.metric == "eval_loss"
