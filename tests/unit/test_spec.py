"""The job spec: examples validate, bad fields are named, cross-field rules hold, layering is kept."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from align.spec import JobSpec, SpecError, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def base(**changes) -> dict:
    spec = {"name": "job", "base_model": "builtin:tiny", "stages": [{"type": "sft", "data": {"path": "d.jsonl"}}]}
    spec.update(changes)
    return spec


def errors_of(data: dict) -> dict[str, str]:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return dict(info.value.errors)


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path):
    job = load_spec(path)
    assert job.stages


def test_examples_exist():
    names = {p.name for p in (REPO / "examples").glob("*.yaml")}
    assert {"tiny-sft-dpo.yaml", "tiny-rm.yaml", "tiny-sft-grpo.yaml", "tiny-sft-rm-ppo.yaml"} <= names


def test_readme_job_spec_validates():
    block = (REPO / "README.md").read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    job = parse_spec(yaml.safe_load(block))
    assert [s.type for s in job.stages] == ["sft", "rm", "dpo", "ppo"]


def test_yaml_and_json_give_the_same_job(tmp_path):
    data = base(stages=[{"type": "sft", "data": {"path": "a.jsonl"}}, {"type": "dpo", "data": {"path": "p.jsonl"}}])
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "job.json").write_text(json.dumps(data))
    from_yaml, from_json = load_spec(tmp_path / "job.yaml"), load_spec(tmp_path / "job.json")
    assert from_yaml == from_json
    assert from_yaml.hash() == from_json.hash()
    assert from_yaml.stage_names() == ["sft", "dpo"]


def test_spec_hash_is_the_sha256_of_canonical_json():
    """The hash covers the validated spec, defaults filled (but an empty report_to, the adapter's default
    rslora, init, num_virtual_tokens and prompt_init_text, a stage's default padding_free and unset gate and
    resources), as JSON with sorted keys and no spaces."""
    job = parse_spec(base())
    reordered = parse_spec({"stages": [{"data": {"path": "d.jsonl"}, "type": "sft"}], "base_model": "builtin:tiny",
                            "name": "job"})
    assert job.hash() == reordered.hash()
    adapter_omits = {"rslora", "init", "num_virtual_tokens", "prompt_init_text"}
    dumped = job.model_dump(mode="json", exclude={"report_to": True, "adapter": adapter_omits,
                                                  "stages": {0: {"padding_free", "gate", "resources"}}})
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    assert canonical.startswith('{"adapter":{"alpha":32.0,"dropout":0.05,"lora_plus_ratio":null,"r":16,')
    assert job.hash() == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert job.hash() != parse_spec(base(name="job2")).hash()
    assert job.hash() != parse_spec(base(adapter={"r": 8})).hash()


def test_spec_hash_of_a_spec_without_report_to_is_as_before_report_to_existed():
    """Jobs stored before ``report_to`` keep their hash: an Idempotency-Key replay of such a request is a replay,
    not a conflict, and a resumed stage's manifest names the job's stored ``spec_hash``. Pinned values: the
    hashes of these specs before the field existed."""
    assert parse_spec(base()).hash() == "sha256:ce191fbcfc481468af43fc8ecb99da366812dd3c26b7179c3a437f0561439e1a"
    assert load_spec(REPO / "examples" / "tiny-sft-dpo.yaml").hash() == (
        "sha256:3540a3d46dc349228ccac31ea33f532782fc4cceefba9997724ace8f7ca26144")
    assert parse_spec(base(report_to="none")).hash() == parse_spec(base()).hash()
    assert parse_spec(base(report_to="tensorboard")).hash() != parse_spec(base()).hash()
    assert parse_spec(base(report_to="all")).hash() != parse_spec(base(report_to="mlflow")).hash()
    # Likewise a stage's padding_free, added later, at its default.
    unpadded = base()
    unpadded["stages"][0]["padding_free"] = False
    assert parse_spec(unpadded).hash() != parse_spec(base()).hash()


def test_defaults_are_filled():
    job = parse_spec(base())
    assert job.adapter.type == "lora" and job.adapter.r == 16
    assert job.deepspeed.zero_stage == 0 and job.deepspeed.precision == "auto"
    assert job.resources.num_workers == 1
    assert job.stages[0].lr == 2e-4


def test_unknown_field_is_named():
    errors = errors_of(base(stages=[{"type": "sft", "data": {"path": "x"}, "learning_rate": 1e-4}]))
    assert errors == {"stages[0].learning_rate": "unknown field; remove it or check its spelling"}


def test_bad_enum_value_names_field_value_and_choices():
    errors = errors_of(base(stages=[{"type": "dpo", "data": {"path": "x"}, "loss": "kto"}]))
    message = errors["stages[0].loss"]
    assert "'sigmoid', 'ipo', 'hinge' or 'robust'" in message and "'kto'" in message


def test_unknown_stage_type_lists_types():
    assert errors_of(base(stages=[{"type": "cpo", "data": {"path": "x"}}])) == {
        "stages[0]": "unknown stage type 'cpo'; use one of sft, rm, dpo, orpo, simpo, kto, ppo, grpo, rloo"
    }


def test_a_kto_stage_needs_some_weight():
    stage = {"type": "kto", "data": {"path": "x"}, "desirable_weight": 0, "undesirable_weight": 0}
    assert errors_of(base(stages=[stage])) == {
        "stages[0]": "desirable_weight and undesirable_weight are both 0, so nothing would be learnt; "
                     "set either above 0"
    }


def rm_stage() -> dict:
    return {"type": "rm", "data": {"path": "builtin:parity/prefs"}}


def ppo_stage(**fields) -> dict:
    return {"type": "ppo", "data": {"path": "builtin:parity/prompts"}, **fields}


def test_ppo_after_sft_and_rm_scores_with_the_job_reward_model():
    from align.spec import POLICY_STAGE_TYPES, PPOStage

    job = parse_spec(base(stages=[{"type": "sft", "data": {"path": "d.jsonl"}}, rm_stage(), ppo_stage()]))
    ppo = job.stages[2]
    assert isinstance(ppo, PPOStage) and job.stage_names() == ["sft", "rm", "ppo"]
    assert (ppo.reward, ppo.reward_model, ppo.critic_init) == ("model", None, "reward_model")
    assert (ppo.kl_estimator, ppo.kl_target, ppo.gamma, ppo.lam, ppo.ppo_epochs) == ("k1", None, 1.0, 0.95, 4)
    assert "ppo" in POLICY_STAGE_TYPES


def test_ppo_needs_a_reward_model():
    errors = errors_of(base(stages=[ppo_stage()]))
    assert set(errors) == {"stages[0].reward_model"}
    assert "add an rm stage before this one or set reward_model: artifact:<id>" in errors["stages[0].reward_model"]
    # An rm stage after it does not count; an artifact reference does.
    assert "stages[0].reward_model" in errors_of(base(stages=[ppo_stage(), rm_stage()]))
    job = parse_spec(base(stages=[ppo_stage(reward_model="artifact:rm.rm-v1-0123456789ab")]))
    assert job.stages[0].reward_model == "artifact:rm.rm-v1-0123456789ab"


def test_ppo_reward_fields_must_agree():
    errors = errors_of(base(stages=[ppo_stage(reward="exact_answer")]))
    assert set(errors) == {"stages[0].critic_init"}
    assert "set critic_init: policy" in errors["stages[0].critic_init"]
    job = parse_spec(base(stages=[ppo_stage(reward="exact_answer", critic_init="policy")]))
    assert job.stages[0].reward == "exact_answer"
    errors = errors_of(base(stages=[ppo_stage(reward="exact_answer", critic_init="policy",
                                              reward_model="artifact:rm.rm-v1-0123456789ab")]))
    assert "only used with reward 'model'" in errors["stages[0].reward_model"]
    errors = errors_of(base(stages=[rm_stage(), ppo_stage(reward_model="http://example.com/rm")]))
    assert set(errors) == {"stages[1].reward_model"}


def scored_stage(type_: str = "dpo", **fields) -> dict:
    """A preference stage on the built-in pairs whose replies to the held-out prompts fit in max_length."""
    data = {"path": "builtin:parity/prefs", "eval_path": "builtin:parity/prefs_eval"}
    return {"type": type_, "data": data, "max_length": 64, "max_new_tokens": 8, **fields}


@pytest.mark.parametrize("type_", ["dpo", "orpo", "simpo"])
def test_a_preference_stage_may_score_its_held_out_replies(type_):
    stage = parse_spec(base(stages=[scored_stage(type_, eval_reward="exact_answer")])).stages[0]
    assert (stage.eval_reward, stage.reward_model, stage.temperature, stage.eval_samples) == (
        "exact_answer", None, 1.0, 1)
    assert stage.scores_generations
    stage = parse_spec(base(stages=[rm_stage(), scored_stage(type_, eval_reward="model")])).stages[1]
    assert (stage.eval_reward, stage.reward_model) == ("model", None), "the rm stage before it scores"
    assert not parse_spec(base(stages=[scored_stage(type_)])).stages[0].scores_generations


def test_eval_reward_model_needs_a_reward_model():
    assert errors_of(base(stages=[scored_stage(eval_reward="model")])) == {
        "stages[0].reward_model": "eval_reward 'model' needs a reward model; add an rm stage before this one or "
                                  "set reward_model: artifact:<id>"}
    assert "stages[0].reward_model" in errors_of(base(stages=[scored_stage(eval_reward="model"), rm_stage()]))
    job = parse_spec(base(stages=[scored_stage(eval_reward="model", reward_model="artifact:rm.rm-v1-0123456789ab")]))
    assert job.stages[0].reward_model == "artifact:rm.rm-v1-0123456789ab"


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"reward_model": "artifact:rm.rm-v1-0123456789ab"}, "stages[0].reward_model",
     "only used with eval_reward 'model', which is unset; set eval_reward: model or drop reward_model"),
    ({"eval_reward": "exact_answer", "reward_model": "artifact:rm.rm-v1-0123456789ab"}, "stages[0].reward_model",
     "only used with eval_reward 'model', not 'exact_answer'; set eval_reward: model or drop reward_model"),
    ({"eval_reward": "exact_answer", "max_new_tokens": 64}, "stages[0].max_new_tokens",
     "64 must be below max_length (64), which holds the prompt and the sampled reply; lower max_new_tokens or "
     "raise max_length"),
    ({"eval_reward": "exact_answer", "data": {"path": "builtin:parity/prefs"}}, "stages[0].eval_reward",
     "scores replies to held-out prompts and this stage has none; set data.eval_path or data.eval_fraction, or "
     "drop eval_reward"),
    ({"eval_reward": "exact_answers"}, "stages[0].eval_reward",
     "Input should be 'model' or 'exact_answer' (got 'exact_answers')"),
    ({"eval_samples": 0}, "stages[0].eval_samples", "Input should be greater than or equal to 1 (got 0)"),
])
def test_held_out_reply_settings_are_checked(fields, field, message):
    assert errors_of(base(stages=[scored_stage(**fields)])) == {field: message}


def test_held_out_reply_settings_only_matter_with_eval_reward():
    """Without eval_reward the sampling settings go unchecked (max_new_tokens may exceed max_length) and, at
    their defaults, leave the spec hash as it was before they existed; online stages keep theirs in it."""
    plain = {"type": "dpo", "data": {"path": "p.jsonl"}, "max_length": 32}
    assert parse_spec(base(stages=[plain])).stages[0].max_new_tokens == 64
    defaults = {"eval_reward": None, "reward_model": None, "max_new_tokens": 64, "temperature": 1.0,
                "eval_samples": 1}
    assert parse_spec(base(stages=[{**plain, **defaults}])).hash() == parse_spec(base(stages=[plain])).hash()
    assert parse_spec(base(stages=[{**plain, "temperature": 0.7}])).hash() != parse_spec(base(stages=[plain])).hash()
    online = ppo_stage(reward="exact_answer", critic_init="policy")
    assert "max_new_tokens" in json.loads(parse_spec(base(stages=[online])).model_dump_json())["stages"][0]


def test_ppo_refuses_full_fine_tuning():
    errors = errors_of(base(adapter={"type": "full"}, stages=[rm_stage(), ppo_stage()]))
    assert "needs adapter.type 'lora', 'dora' or 'ia3' (got 'full')" in errors["stages[1].type"]
    assert parse_spec(base(deepspeed={"zero_stage": 3}, stages=[rm_stage(), ppo_stage()])).stages[1].type == "ppo"


def grpo_stage(**fields) -> dict:
    return {"type": "grpo", "data": {"path": "builtin:parity/prompts"}, "reward": "exact_answer", **fields}


def test_grpo_and_rloo_validate_as_policy_stages():
    from align.spec import POLICY_STAGE_TYPES, GRPOStage

    job = parse_spec(base(stages=[{"type": "sft", "data": {"path": "d.jsonl"}}, grpo_stage(), grpo_stage(type="rloo")]))
    assert [type(s) for s in job.stages[1:]] == [GRPOStage, GRPOStage]
    assert job.stage_names() == ["sft", "grpo", "rloo"]
    assert job.stages[1].group_size == 8 and job.stages[1].kl_coef == 0.04
    assert {"grpo", "rloo"} <= set(POLICY_STAGE_TYPES)


def test_unknown_reward_is_refused_with_the_allowed_names():
    errors = errors_of(base(stages=[grpo_stage(reward="my_module.my_reward")]))
    assert set(errors) == {"stages[0].reward"}
    assert "'exact_answer'" in errors["stages[0].reward"] and "'my_module.my_reward'" in errors["stages[0].reward"]
    no_reward = grpo_stage()
    del no_reward["reward"]
    assert errors_of(base(stages=[no_reward])) == {"stages[0].reward": "required field is missing"}


def test_reward_allow_list_matches_the_reward_table():
    from typing import get_args

    from align.rewards import REWARDS, reward_function
    from align.spec import RewardName
    from align.task import exact_answer_reward

    assert set(REWARDS) == set(get_args(RewardName))
    assert reward_function("exact_answer") is exact_answer_reward
    with pytest.raises(ValueError, match="known rewards: exact_answer"):
        reward_function("os.system")


def test_grpo_rules():
    errors = errors_of(base(stages=[grpo_stage(group_size=1)]))
    assert "greater than or equal to 2" in errors["stages[0].group_size"]
    errors = errors_of(base(stages=[grpo_stage(max_new_tokens=64, max_length=64)]))
    assert errors == {
        "stages[0].max_new_tokens": "64 must be below max_length (64), which holds the prompt and the completion"
    }
    errors = errors_of(base(adapter={"type": "full"}, stages=[grpo_stage()]))
    assert "adapter.type 'lora', 'dora' or 'ia3'" in errors["stages[0].type"]
    errors = errors_of(base(stages=[grpo_stage(kl_penalty="sequence")]))
    assert "'loss' or 'reward'" in errors["stages[0].kl_penalty"]


def test_missing_data_is_named():
    assert errors_of(base(stages=[{"type": "sft"}])) == {"stages[0].data": "required field is missing"}


def test_qlora_with_zero3_is_refused_with_reason():
    errors = errors_of(base(quantization={"bits": 4}, deepspeed={"zero_stage": 3}))
    assert "ZeRO-3 shards parameters" in errors["quantization"]


def test_quantized_full_fine_tuning_is_refused():
    errors = errors_of(base(quantization={"bits": 4}, adapter={"type": "full"}))
    assert "frozen" in errors["quantization"]


def test_offload_needs_zero():
    errors = errors_of(base(deepspeed={"zero_stage": 0, "offload_optimizer": True}))
    assert "zero_stage 1, 2 or 3" in errors["deepspeed.offload_optimizer"]


def test_label_smoothing_only_for_sigmoid_and_robust():
    errors = errors_of(base(stages=[{"type": "dpo", "data": {"path": "x"}, "loss": "hinge", "label_smoothing": 0.1}]))
    assert "only applies to loss 'sigmoid' or 'robust'" in errors["stages[0].label_smoothing"]


def test_prompt_length_below_max_length():
    errors = errors_of(base(stages=[{"type": "dpo", "data": {"path": "x"}, "max_length": 64, "max_prompt_length": 64}]))
    assert "must be below max_length" in errors["stages[0].max_prompt_length"]


def test_duplicate_stage_names_refused_and_repeated_types_numbered():
    errors = errors_of(base(stages=[{"type": "sft", "name": "a", "data": {"path": "x"}},
                                    {"type": "dpo", "name": "a", "data": {"path": "x"}}]))
    assert "used twice" in errors["stages[1].name"]
    job = parse_spec(base(stages=[{"type": "sft", "data": {"path": "x"}}, {"type": "sft", "data": {"path": "y"}}]))
    assert job.stage_names() == ["sft-0", "sft-1"]


def test_remote_and_unknown_models_refused():
    assert "remote location" in errors_of(base(base_model="https://example.org/model"))["base_model"]
    assert "builtin:tiny" in errors_of(base(base_model="builtin:huge"))["base_model"]


def test_range_errors_name_the_value():
    errors = errors_of(base(stages=[{"type": "sft", "data": {"path": "x"}, "lr": -1}]))
    assert "greater than 0" in errors["stages[0].lr"] and "-1" in errors["stages[0].lr"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg)

    walk(JobSpec)
    from align.spec import DPOStage, GRPOStage, RewardModelStage, SFTStage

    for stage in (SFTStage, RewardModelStage, DPOStage, GRPOStage):
        walk(stage)


def test_training_library_imports_no_service_code():
    forbidden = {"fastapi", "sqlalchemy", "alembic", "ray", "starlette", "services", "workers"}
    for path in (REPO / "align").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.relative_to(REPO)} imports {name}"


def test_adapter_methods_and_what_they_refuse():
    """rslora and init are LoRA settings; PiSSA/OLoRA rewrite base weights, which quantised ones cannot be; bias
    training, like full fine-tuning, has no frozen base to quantise nor an adapter for an online reference."""
    job = parse_spec(base(adapter={"type": "lora", "rslora": True, "init": "olora"}))
    assert (job.adapter.rslora, job.adapter.init, job.adapter.is_peft) == (True, "olora", True)
    assert parse_spec(base(adapter={"type": "ia3"})).adapter.is_peft
    assert not parse_spec(base(adapter={"type": "bias"})).adapter.is_peft

    errors = errors_of(base(adapter={"type": "ia3", "rslora": True}))
    assert "for adapter.type 'lora' or 'dora', not 'ia3'; set rslora false" in errors["adapter.rslora"]
    for adapter_type in ("dora", "ia3", "bias", "full"):
        errors = errors_of(base(adapter={"type": adapter_type, "init": "pissa"}))
        assert f"needs adapter.type 'lora' (got '{adapter_type}'); set init: default" in errors["adapter.init"]
    errors = errors_of(base(adapter={"type": "ia3", "lora_plus_ratio": 4}))
    assert "adapter.type 'ia3' has none; remove lora_plus_ratio" in errors["adapter.lora_plus_ratio"]
    errors = errors_of(base(adapter={"init": "pissa"}, quantization={"bits": 4}))
    assert "use init: default with quantization, or drop quantization" in errors["adapter.init"]
    errors = errors_of(base(adapter={"type": "bias"}, quantization={"bits": 4}))
    assert "not possible with adapter.type='bias'" in errors["quantization"]
    errors = errors_of(base(adapter={"type": "bias"}, stages=[grpo_stage()]))
    assert "needs adapter.type 'lora', 'dora' or 'ia3' (got 'bias')" in errors["stages[0].type"]
    assert parse_spec(base(adapter={"type": "ia3"}, stages=[grpo_stage()], quantization={"bits": 4}))


def test_spec_hash_ignores_the_adapter_fields_at_their_defaults():
    """Jobs stored before rslora, init, num_virtual_tokens and prompt_init_text existed keep their hash; setting
    any changes it."""
    at_defaults = {"rslora": False, "init": "default", "num_virtual_tokens": 20, "prompt_init_text": None}
    assert parse_spec(base(adapter=at_defaults)).hash() == parse_spec(base()).hash()
    assert parse_spec(base(adapter={"rslora": True})).hash() != parse_spec(base()).hash()
    assert parse_spec(base(adapter={"init": "pissa"})).hash() != parse_spec(base()).hash()
    prompt = parse_spec(base(adapter={"type": "prompt"})).hash()
    assert parse_spec(base(adapter={"type": "prompt", "num_virtual_tokens": 8})).hash() != prompt
    assert parse_spec(base(adapter={"type": "prompt", "prompt_init_text": "add"})).hash() != prompt


def test_spec_reference_in_docs_is_current():
    from align.spec_docs import render_markdown

    assert (REPO / "docs" / "spec.md").read_text() == render_markdown() + "\n", "run: align spec-docs > docs/spec.md"


def test_a_stage_may_ask_for_its_own_resources():
    """SFT on 8 GPUs, then the reward model on 2: a stage's `resources` replaces the job's for that stage
    only; unset, the spec hashes as it did before the field existed."""
    spec = base(resources={"num_workers": 8, "gpus_per_worker": 1},
                stages=[{"type": "sft", "data": {"path": "d.jsonl"}},
                        {"type": "rm", "data": {"path": "p.jsonl"},
                         "resources": {"num_workers": 2, "gpus_per_worker": 1}}])
    job = parse_spec(spec)
    assert [job.stage_resources(i).num_workers for i in range(2)] == [8, 2]
    assert job.stage_resources(1).cpus_per_worker == 1.0, "a stage's resources take the field defaults"
    assert parse_spec(base()).hash() == parse_spec(base(stages=[{"type": "sft", "data": {"path": "d.jsonl"},
                                                                 "resources": None}])).hash()
    assert errors_of({**spec, "stages": [{**spec["stages"][0], "resources": {"num_workers": 0}}]}) == {
        "stages[0].resources.num_workers": "Input should be greater than or equal to 1 (got 0)"}
