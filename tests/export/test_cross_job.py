"""``base_model: artifact:<id>``: a job continues another job's policy, and lineage crosses the jobs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from align.lineage import InputArtifact, MissingInput, stage_inputs, start_artifact_check
from align.models.load import load_tokenizer, resolve_base_model
from align.runner import run_job
from align.spec import parse_spec


def test_job_two_continues_job_ones_policy(chain, small_model):
    """Job 2's DPO starts from job 1's SFT adapter: its reference is that policy, so the first step's DPO loss
    is ln 2 to float precision; its manifest names job 1's artifact as the parent, and its adapter, which
    continues job 1's, names the real base model."""
    records = [json.loads(line) for line in (chain.work / "dpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "dpo_loss" in r)
    assert first["step"] == 1
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards_margin"] == pytest.approx(0.0, abs=1e-6)

    manifest = chain.dpo.artifact.manifest
    assert manifest.parents == [chain.sft.artifact.artifact_id]
    assert manifest.base_model == f"artifact:{chain.sft.artifact.artifact_id}"
    folder = Path(chain.dpo.artifact.uri)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(small_model)
    card = (folder / "README.md").read_text()
    assert f"- parents: `artifact:{chain.sft.artifact.artifact_id}`" in card
    # The card describes the adapter continued (job 1's rank), not the rank job 2's spec asked for.
    adapter_line = next(line for line in card.splitlines() if line.startswith("- adapter: "))
    assert adapter_line.startswith("- adapter: lora r=4 alpha=8 dropout=0 targets=")
    assert adapter_line.endswith(f", continued from `artifact:{chain.sft.artifact.artifact_id}`")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    # The DPO step moved the policy away from job 1's: the adapter was trained, not copied.
    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    tokenizer = load_tokenizer(small_model)
    ids = tokenizer(["add 3 and 8"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        sft_logits = PeftModel.from_pretrained(base, chain.sft.artifact.uri)(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    with torch.no_grad():
        dpo_logits = PeftModel.from_pretrained(base, folder)(input_ids=ids).logits
    assert (dpo_logits - sft_logits).abs().max() > 1e-4


def test_artifact_base_model_resolves_to_the_weights_under_it(chain, small_model):
    assert resolve_base_model(f"artifact:{chain.sft.artifact.artifact_id}", artifact_root=chain.root) == small_model
    # A chain of chains still reaches the first base model.
    assert resolve_base_model(f"artifact:{chain.dpo.artifact.artifact_id}", artifact_root=chain.root) == small_model


def test_a_missing_start_artifact_stops_the_local_run_before_any_stage(chain, small_data, tmp_path):
    job = parse_spec({**chain.second.model_dump(mode="json"), "base_model": "artifact:first.sft-v9-0123456789ab"})
    with pytest.raises(MissingInput) as caught:
        run_job(job, work_root=tmp_path / "work", artifact_root=chain.root)
    assert caught.value.field == "base_model"
    assert "no artifact 'first.sft-v9-0123456789ab'" in caught.value.message
    assert not (tmp_path / "work").exists()


def _job(base_model: str, adapter: str = "lora"):
    return parse_spec({"name": "next", "base_model": base_model, "adapter": {"type": adapter},
                       "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}},
                                  {"type": "dpo", "data": {"path": "builtin:parity/prefs"}}]})


def test_stage_inputs_start_from_the_named_policy():
    """Adapters are continued (the start policy); full weights are the base (no start policy); either is the
    first stage's parent, and a later stage starts from the job's own artifact."""
    found = {"a.sft-v1-0123456789ab": InputArtifact("a.sft-v1-0123456789ab", "/store/a", "adapter"),
             "f.sft-v1-0123456789ab": InputArtifact("f.sft-v1-0123456789ab", "/store/f", "full")}
    job = _job("artifact:a.sft-v1-0123456789ab")
    assert stage_inputs(job, 0, {}, found.get) == ("/store/a", ["a.sft-v1-0123456789ab"], None)
    own = InputArtifact("next.sft-v1-0123456789ab", "/store/next", "adapter")
    assert stage_inputs(job, 1, {0: own}, found.get) == ("/store/next", ["next.sft-v1-0123456789ab"], None)
    full = _job("artifact:f.sft-v1-0123456789ab")
    assert stage_inputs(full, 0, {}, found.get) == (None, ["f.sft-v1-0123456789ab"], None)


@pytest.mark.parametrize(("kind", "adapter", "message"), [
    (None, "lora", "no artifact 'x.sft-v1-0123456789ab'; give artifact:<id> of a policy that a stage of one of "
                   "your jobs published"),
    ("reward_model", "lora", "'x.sft-v1-0123456789ab' is an artifact of kind 'reward_model', not a policy; give "
                             "artifact:<id> of an artifact an sft, dpo, orpo, simpo, kto, ppo, grpo or rloo stage "
                             "published (kind adapter or full)"),
    ("adapter", "full", "'x.sft-v1-0123456789ab' is an adapter and this job sets adapter.type 'full'; set "
                        "adapter.type to 'lora', 'dora' or 'ia3' to continue the adapter, or export the merged model "
                        "(align export --merge) and give its folder as base_model"),
    ("adapter", "bias", "'x.sft-v1-0123456789ab' is an adapter and this job sets adapter.type 'bias'; set "
                        "adapter.type to 'lora', 'dora' or 'ia3' to continue the adapter, or export the merged model "
                        "(align export --merge) and give its folder as base_model"),
])
def test_an_unfit_start_artifact_is_refused(kind, adapter, message):
    job = _job("artifact:x.sft-v1-0123456789ab", adapter)
    artifact = InputArtifact("x.sft-v1-0123456789ab", "/store/x", kind) if kind else None
    assert start_artifact_check(job, lambda _id: artifact) == message
    with pytest.raises(MissingInput) as caught:
        stage_inputs(job, 0, {}, lambda _id: artifact)
    assert (caught.value.field, caught.value.message) == ("base_model", message)
    assert start_artifact_check(_job("builtin:tiny"), lambda _id: None) is None


def test_validate_looks_the_start_artifact_up_in_the_local_store(chain, tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    spec = tmp_path / "next.yaml"
    stages = [{"type": "dpo", "data": {"path": "builtin:parity/prefs"}}]
    spec.write_text(json.dumps({"name": "next", "base_model": f"artifact:{chain.sft.artifact.artifact_id}",
                                "stages": stages}))
    result = CliRunner().invoke(app, ["validate", str(spec), "--artifact-root", chain.root])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: next (dpo)")
    result = CliRunner().invoke(app, ["validate", str(spec), "--artifact-root", str(tmp_path / "empty")])
    assert result.exit_code != 0
    assert (f"base_model: no artifact '{chain.sft.artifact.artifact_id}'; give artifact:<id> of a policy"
            in result.output)


def test_a_reward_model_of_the_job_continued_scores_the_continuation():
    """Job 1 trained an SFT policy and a reward model on builtin:tiny; job 2 continues the policy and
    scores with that reward model: both stand on builtin:tiny. One trained on another base is refused."""
    found = {
        "a.sft-v1-0123456789ab": InputArtifact("a.sft-v1-0123456789ab", "/store/a", "adapter", "builtin:tiny"),
        "a.rm-v1-0123456789ab": InputArtifact("a.rm-v1-0123456789ab", "/store/rm", "reward_model", "builtin:tiny"),
        "b.rm-v1-0123456789ab": InputArtifact("b.rm-v1-0123456789ab", "/store/b", "reward_model", "/models/other"),
    }
    job = parse_spec({"name": "next", "base_model": "artifact:a.sft-v1-0123456789ab", "stages": [
        {"type": "ppo", "data": {"path": "builtin:parity/prompts"}, "reward_model": "artifact:a.rm-v1-0123456789ab"}]})
    assert stage_inputs(job, 0, {}, found.get) == (
        "/store/a", ["a.sft-v1-0123456789ab", "a.rm-v1-0123456789ab"], "/store/rm")
    other = parse_spec({**job.model_dump(mode="json"), "stages": [
        {**job.model_dump(mode="json")["stages"][0], "reward_model": "artifact:b.rm-v1-0123456789ab"}]})
    with pytest.raises(MissingInput, match="trained on base model '/models/other' and this job trains 'builtin:tiny'"):
        stage_inputs(other, 0, {}, found.get)


def test_post_follows_artifact_base_models_to_compare_reward_models():
    from types import SimpleNamespace

    from services.paths import check_reward_models

    rows = {"a.sft-v1-0123456789ab": SimpleNamespace(kind="adapter", base="builtin:tiny"),
            "a.rm-v1-0123456789ab": SimpleNamespace(kind="reward_model", base="builtin:tiny"),
            "b.rm-v1-0123456789ab": SimpleNamespace(kind="reward_model", base="/models/other")}
    stage = {"type": "ppo", "data": {"path": "builtin:parity/prompts"}, "reward_model": "artifact:a.rm-v1-0123456789ab"}
    job = parse_spec({"name": "next", "base_model": "artifact:a.sft-v1-0123456789ab", "stages": [stage]})
    assert check_reward_models(job, rows.get, lambda row: row.base) == []
    other = parse_spec({**job.model_dump(mode="json"),
                        "stages": [{**stage, "reward_model": "artifact:b.rm-v1-0123456789ab"}]})
    assert check_reward_models(other, rows.get, lambda row: row.base) == [(
        "stages[0].reward_model", "'b.rm-v1-0123456789ab' was trained on base model '/models/other' and this job "
        "trains 'builtin:tiny'; give a reward model trained on the same base model")]


def test_full_weights_named_as_base_model_are_a_base_of_their_own():
    """Job 1 fully fine-tuned builtin:tiny and trained a reward model on builtin:tiny. A job on job 1's full
    weights scores with a reward model loaded on those weights (the job's base model), not on builtin:tiny,
    so that reward model is refused, at the stage launch and at POST alike; one trained on the full weights
    is accepted."""
    from types import SimpleNamespace

    from services.paths import check_reward_models

    found = {
        "f.sft-v1-0123456789ab": InputArtifact("f.sft-v1-0123456789ab", "/store/f", "full", "builtin:tiny"),
        "f.rm-v1-0123456789ab": InputArtifact("f.rm-v1-0123456789ab", "/store/frm", "reward_model", "builtin:tiny"),
        "g.rm-v1-0123456789ab": InputArtifact("g.rm-v1-0123456789ab", "/store/grm", "reward_model",
                                              "artifact:f.sft-v1-0123456789ab"),
    }
    stage = {"type": "ppo", "data": {"path": "builtin:parity/prompts"}, "reward_model": "artifact:f.rm-v1-0123456789ab"}
    job = parse_spec({"name": "next", "base_model": "artifact:f.sft-v1-0123456789ab", "stages": [stage]})
    message = ("'f.rm-v1-0123456789ab' was trained on base model 'builtin:tiny' and this job trains "
               "'artifact:f.sft-v1-0123456789ab'; give a reward model trained on the same base model")
    with pytest.raises(MissingInput) as caught:
        stage_inputs(job, 0, {}, found.get)
    assert caught.value.message == message
    rows = {key: SimpleNamespace(kind=value.kind, base=value.base_model) for key, value in found.items()}
    assert check_reward_models(job, rows.get, lambda row: row.base) == [("stages[0].reward_model", message)]

    own = parse_spec({**job.model_dump(mode="json"),
                      "stages": [{**stage, "reward_model": "artifact:g.rm-v1-0123456789ab"}]})
    assert stage_inputs(own, 0, {}, found.get) == (
        None, ["f.sft-v1-0123456789ab", "g.rm-v1-0123456789ab"], "/store/grm")
    assert check_reward_models(own, rows.get, lambda row: row.base) == []
