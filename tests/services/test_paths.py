"""Data and model locations: roots, schemes, `..`, and the data check before a job is accepted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from align.spec import parse_spec
from services.paths import check_data, check_locations, check_model, check_reward_models, location_problem


@pytest.fixture
def roots(tmp_path):
    data, models, outside = tmp_path / "data", tmp_path / "models", tmp_path / "outside"
    for folder in (data, models, outside):
        folder.mkdir()
    return data, models, outside


def spec_with(data_path: str, base_model: str = "builtin:tiny", eval_path: str | None = None, kind: str = "sft"):
    data = {"path": data_path} | ({"eval_path": eval_path} if eval_path else {})
    return parse_spec({"name": "t", "base_model": base_model, "stages": [{"type": kind, "data": data}]})


@pytest.mark.parametrize(
    "location, fragment",
    [
        ("{data}/../outside/x.jsonl", "'..'"),
        ("{outside}/x.jsonl", "no such file or folder in your data folders"),
        ("/etc/passwd", "no such file or folder in your data folders"),
        ("file:///etc/passwd", "no such file or folder in your data folders"),
        ("{data}/missing.jsonl", "no such file or folder in your data folders"),
        ("http://169.254.169.254/latest/meta-data", "web address"),
        ("https://example.com/data.jsonl", "web address"),
        ("s3://bucket/data.jsonl", "scheme 's3://' is not allowed"),
        ("data/sft.jsonl", "not an absolute path"),
        ("~/sft.jsonl", "not an absolute path"),
    ],
)
def test_refused_locations(roots, location, fragment):
    data, _, outside = roots
    problem = location_problem(location.format(data=data, outside=outside), [data], ["file"])
    assert problem is not None and fragment in problem


def test_allowed_locations(roots):
    data, _, _ = roots
    (data / "sft.jsonl").write_text("{}\n")
    assert location_problem(f"{data}/sft.jsonl", [data], ["file"]) is None
    assert location_problem(f"file://{data}/sft.jsonl", [data], ["file"]) is None
    assert location_problem("builtin:parity/sft", [data], ["file"]) is None
    assert location_problem("s3://bucket/x.jsonl", [data], ["file", "s3"]) is None
    assert location_problem("s3://bucket/../x.jsonl", [data], ["file", "s3"]) is not None
    assert location_problem("artifact:m-v1-0123456789ab", [data], ["file"], allow_artifact=True) is None
    assert location_problem("artifact:m-v1-0123456789ab", [data], ["file"]) is not None


def test_symlink_out_of_a_root_is_refused(roots):
    data, _, outside = roots
    (outside / "secret.jsonl").write_text("{}\n")
    (data / "link.jsonl").symlink_to(outside / "secret.jsonl")
    assert location_problem(str(data / "link.jsonl"), [data], ["file"]) == location_problem(
        str(data / "missing.jsonl"), [data], ["file"]).replace("missing.jsonl", "link.jsonl")


def test_check_locations_names_each_field(roots):
    data, models, outside = roots
    spec = spec_with(str(outside / "a.jsonl"), base_model=str(outside / "model"), eval_path=f"{data}/../b.jsonl")
    problems = dict(check_locations(spec, data_roots=[data], model_roots=[models], allowed_schemes=["file"]))
    assert set(problems) == {"base_model", "stages[0].data.path", "stages[0].data.eval_path"}
    # A refusal by the roots names the setting that lists them, and the roots themselves.
    assert problems["stages[0].data.path"] == (
        f"'{outside}/a.jsonl': no such file or folder in your data folders [{data}]; give the full path of one "
        "under them (the service's ALIGN_DATA_ROOTS)"
    )
    assert problems["base_model"] == (
        f"'{outside}/model': no such model folder in your model folders [{models}]; give the full path of one "
        "under them (the service's ALIGN_MODEL_ROOTS)"
    )
    web = spec_with("https://example.com/d.jsonl")
    (message,) = dict(check_locations(web, data_roots=[data], model_roots=[models], allowed_schemes=["file"])).values()
    assert message.endswith(f"give a path under [{data}] (the service's ALIGN_DATA_ROOTS)")


def test_check_data_names_missing_files_and_columns(roots):
    data, _, _ = roots
    (data / "prefs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    missing = dict(check_data(spec_with(str(data / "nope.jsonl"))))
    assert "no such file" in missing["stages[0].data.path"]
    columns = dict(check_data(spec_with(str(data / "prefs.jsonl"), kind="dpo")))
    assert "'rejected'" in columns["stages[0].data.path"] and "missing column" in columns["stages[0].data.path"]
    assert check_data(spec_with("builtin:parity/sft")) == []
    assert "unknown built-in dataset" in dict(check_data(spec_with("builtin:nope")))["stages[0].data.path"]


def test_check_model_needs_a_model_folder(roots):
    _, models, _ = roots
    assert check_model(spec_with("builtin:parity/sft")) == []
    problems = dict(check_model(spec_with("builtin:parity/sft", base_model=str(models))))
    assert "config.json" in problems["base_model"]


def test_check_reward_models_names_each_stage_and_leaves_unnamed_ones_alone():
    artifacts = {"m.rm-v1-0123456789ab": SimpleNamespace(kind="reward_model"),
                 "m.sft-v1-0123456789ab": SimpleNamespace(kind="adapter")}
    prompts = {"path": "builtin:parity/prompts"}
    stages = [
        {"type": "sft", "data": {"path": "builtin:parity/sft"}},
        {"type": "ppo", "data": prompts, "reward_model": "artifact:m.rm-v1-0123456789ab"},
        {"type": "grpo", "data": prompts, "reward": "model",
         "reward_model": "artifact:m.sft-v1-0123456789ab"},
        {"type": "rm", "data": {"path": "builtin:parity/prefs"}},
        {"type": "rloo", "data": prompts, "reward": "model", "reward_model": "artifact:nope-v1-0123456789ab"},
        {"type": "ppo", "data": prompts},
        {"type": "grpo", "data": prompts, "reward": "exact_answer"},
    ]
    spec = parse_spec({"name": "t", "base_model": "builtin:tiny", "stages": stages})
    looked_up = []

    def find(artifact_id):
        looked_up.append(artifact_id)
        return artifacts.get(artifact_id)

    problems = dict(check_reward_models(spec, find))
    assert looked_up == ["m.rm-v1-0123456789ab", "m.sft-v1-0123456789ab", "nope-v1-0123456789ab"]
    assert problems == {
        "stages[2].reward_model": "'m.sft-v1-0123456789ab' is an artifact of kind 'adapter', not a reward "
        "model; give artifact:<id> of an artifact an rm stage published (kind reward_model)",
        "stages[4].reward_model": "no artifact 'nope-v1-0123456789ab'; give artifact:<id> of a reward model "
        "that an rm stage of one of your jobs published or drop reward_model to score with the rm stage "
        "before this one",
    }


def test_check_reward_models_needs_the_job_base_model():
    artifacts = {"m.rm-v1-0123456789ab": SimpleNamespace(kind="reward_model", base="/models/other")}
    spec = parse_spec({"name": "t", "base_model": "builtin:tiny", "stages": [
        {"type": "ppo", "data": {"path": "builtin:parity/prompts"}, "reward_model": "artifact:m.rm-v1-0123456789ab"},
    ]})
    problems = dict(check_reward_models(spec, artifacts.get, lambda artifact: artifact.base))
    assert problems == {
        "stages[0].reward_model": "'m.rm-v1-0123456789ab' was trained on base model '/models/other' and this job "
        "trains 'builtin:tiny'; give a reward model trained on the same base model",
    }
    assert check_reward_models(spec, artifacts.get, lambda artifact: "builtin:tiny") == []
