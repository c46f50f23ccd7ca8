"""Model cards and base-model references of published artifacts; loading an artifact finds its base model."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from align.artifacts import ArtifactStore, sha256_file
from align.engine.dist import Rank
from align.model_card import (
    base_model_license,
    base_model_reference,
    read_front_matter,
    render_model_card,
    stage_hyperparameters,
)
from align.models.load import load_artifact
from align.models.policy import load_policy, load_reward_model_for
from align.precision import resolve
from align.spec import parse_spec
from align.stages.artifact import publish
from align.stages.context import StageContext

FINGERPRINT = "sha256:" + "ab" * 32
SECTIONS = ["Base model", "Stages", "Data fingerprints", "Final metrics", "Lineage", "Precision"]


def job_spec(base_model: str, stages: list[dict] | None = None, **overrides):
    spec = {
        "name": "card",
        "base_model": base_model,
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "deepspeed": {"zero_stage": 0, "precision": "fp32"},
        "stages": stages or [{"type": "sft", "data": {"path": "/data/sft.jsonl"}, "batch_size": 4, "max_steps": 6,
                              "lr": 1e-3, "seed": 7}],
    }
    return parse_spec(spec | overrides)


def stage_context(job, index: int, tmp_path: Path, start_policy: Path | None = None, parents=()):
    ctx = StageContext(
        job=job, index=index, work_dir=tmp_path / "work" / job.stage_names()[index],
        artifact_root=str(tmp_path / "artifacts"), start_policy=start_policy, parents=list(parents), job_id="job-1",
    )
    ctx.precision = resolve("fp32")
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    return ctx


def publish_trained_adapter(ctx):
    """The stage's own publish path, on a policy whose LoRA B matrices are non-zero (so loading is visible)."""
    tokenizer, model = load_policy(ctx.job, ctx.start_policy, ctx.dtype)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    result = publish(ctx, model, tokenizer, Rank(0, 1, 0), kind="adapter",
                            metrics={"loss": 0.5, "steps": 6}, fingerprints={"train": FINGERPRINT})
    return model.eval(), Path(result.artifact.uri), result.artifact


def logits(model, ids=((5, 6, 7, 8, 9),)) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


# --- base-model references ----------------------------------------------------------------------------


def test_base_model_reference_keeps_names_urls_and_absolute_paths_and_anchors_relative_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert base_model_reference("builtin:tiny") == "builtin:tiny"
    assert base_model_reference("artifact:a.sft-v1-0123456789ab") == "artifact:a.sft-v1-0123456789ab"
    assert base_model_reference("file:///models/llama") == "file:///models/llama"
    assert base_model_reference("/models/../models/llama") == "/models/../models/llama"
    assert base_model_reference("~/models/llama") == "~/models/llama"
    assert base_model_reference("models/llama") == str(tmp_path / "models" / "llama")
    assert base_model_reference("./models/../llama") == str(tmp_path / "llama")


def test_licence_comes_from_the_base_models_own_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [llama]\n---\n# A base model\n")
    assert base_model_license(tmp_path) == {"license": "apache-2.0"}
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: acme-1.0\nlicense_link: LICENSE\n---\n")
    assert base_model_license(tmp_path) == {"license": "other", "license_name": "acme-1.0", "license_link": "LICENSE"}
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert base_model_license(tmp_path) == {"license": "other"}
    assert base_model_license(tmp_path / "missing") == {"license": "other"}


# --- the card's text ----------------------------------------------------------------------------------


def test_card_of_a_later_stage_lists_the_chain_with_parents_and_key_hyperparameters():
    job = job_spec("/models/llama", stages=[
        {"type": "sft", "data": {"path": "/data/sft.jsonl"}, "max_steps": 6, "lr": 1e-3, "seed": 7},
        {"type": "rm", "data": {"path": "/data/prefs.jsonl"}, "epochs": 2},
        {"type": "dpo", "name": "align", "data": {"path": "/data/prefs.jsonl", "eval_path": "/data/held.jsonl"},
         "beta": 0.2, "warmup_ratio": 0.1, "eval_reward": "model", "max_new_tokens": 16},
    ], quantization={"bits": 4})
    parents = ["card.sft-v3-0123456789ab"]
    text = render_model_card(
        job, 2, kind="adapter", lineage="card.align", parents=parents,
        data_fingerprints={"train": FINGERPRINT, "eval": "sha256:" + "cd" * 32},
        metrics={"loss": 0.123456789, "steps": 40}, license={"license": "apache-2.0"},
        precision={"requested": "fp32", "precision": "fp32", "device": "cpu", "warning": None}, job_id="j-9",
    )
    assert read_front_matter(text) == {
        "base_model": "/models/llama", "library_name": "peft", "license": "apache-2.0",
        "pipeline_tag": "text-generation", "tags": ["align", "dpo", "lora"],
        "datasets": [FINGERPRINT, "sha256:" + "cd" * 32],
    }
    assert re.findall(r"^## (.+)$", text, flags=re.MULTILINE) == SECTIONS
    assert "| 0 | sft | sft | lr=0.001, lr_scheduler=cosine, warmup_ratio=0, batch_size=8, " \
           "gradient_accumulation_steps=1, max_steps=6, max_length=512, seed=7 | " \
           "`artifact:card.sft-v3-0123456789ab` |" in text
    assert "| 1 | rm | rm | lr=5e-05, lr_scheduler=cosine, warmup_ratio=0, batch_size=8, " \
           "gradient_accumulation_steps=1, epochs=2, max_length=512, seed=42, init=policy | - |" in text
    assert "| 2 | align | dpo | lr=5e-05, lr_scheduler=cosine, warmup_ratio=0.1, batch_size=8, " \
           "gradient_accumulation_steps=1, epochs=1, max_length=512, seed=42, beta=0.2, loss=sigmoid, " \
           "label_smoothing=0, sft_weight=0, reference=live, eval_reward=model | this artifact |" in text
    assert f"| eval | `/data/held.jsonl` | `sha256:{'cd' * 32}` |" in text
    assert "| loss | 0.123457 |" in text and "| steps | 40 |" in text
    assert "- parents: `artifact:card.sft-v3-0123456789ab`" in text
    assert "- job: `card` (id `j-9`)" in text and f"- spec hash: `{job.hash()}`" in text
    assert "- quantization: 4-bit nf4, double_quant=True" in text
    assert "- precision: fp32" in text and "warning" not in text


def test_reward_model_and_full_fine_tuning_cards_say_what_they_are():
    job = job_spec("builtin:tiny", adapter={"type": "full"},
                   stages=[{"type": "rm", "data": {"path": "/data/prefs.jsonl"}, "max_steps": 2}])
    text = render_model_card(job, 0, kind="reward_model", lineage="card.rm", parents=[], data_fingerprints={},
                             metrics={}, precision=None)
    meta = read_front_matter(text)
    assert (meta["library_name"], meta["pipeline_tag"], meta["tags"]) == (
        "transformers", "text-classification", ["align", "rm", "full", "reward-model"])
    assert meta["license"] == "other" and meta["datasets"] == []
    assert "A reward model (fully fine-tuned model) on `builtin:tiny`" in text
    assert "- parents: none" in text and "None recorded." in text and "Not recorded." in text
    assert stage_hyperparameters(job.stages[0])["max_steps"] == 2


@pytest.mark.parametrize(("adapter", "library", "what", "line"), [
    ({"type": "ia3"}, "peft", "An IA3 adapter",
     "- adapter: ia3 targets=all-linear (peft's IA3 targets for the architecture)"),
    ({"type": "bias"}, "transformers", "A bias-tuned (BitFit) model",
     "- adapter: bias terms only (BitFit; every other weight is the base model's)"),
    ({"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "rslora": True, "init": "pissa"}, "peft", "A LoRA adapter",
     "- adapter: lora r=4 alpha=8 dropout=0 targets=all-linear rslora (scale alpha/sqrt(r)) init=pissa (saved "
     "converted to a rank-8 LoRA adapter on the untouched base model)"),
], ids=["ia3", "bias", "rslora-pissa"])
def test_cards_of_the_other_adapter_methods_say_what_they_are(adapter, library, what, line):
    job = job_spec("builtin:tiny", adapter=adapter)
    text = render_model_card(job, 0, kind="adapter" if library == "peft" else "full", lineage="card.sft", parents=[],
                             data_fingerprints={}, metrics={}, precision=None)
    assert read_front_matter(text)["library_name"] == library
    assert f"{what} on `builtin:tiny`" in text
    assert line + "\n" in text


# --- published artifacts ------------------------------------------------------------------------------


def test_published_adapter_names_builtin_tiny_and_loads_back_on_it(tmp_path):
    """After the stage's publish: adapter_config names ``builtin:tiny`` (never the cache folder), README.md
    is align's card (not peft's template) and the manifest's sha256 is that of the card stored; the artifact
    loads by reference and by folder, and the next stage starts from the same policy."""
    job = job_spec("builtin:tiny", stages=[
        {"type": "sft", "data": {"path": "/data/sft.jsonl"}, "max_steps": 6, "lr": 1e-3, "seed": 7},
        {"type": "dpo", "data": {"path": "/data/prefs.jsonl"}, "max_steps": 2},
    ])
    trained, folder, artifact = publish_trained_adapter(stage_context(job, 0, tmp_path))

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:tiny"
    card = (folder / "README.md").read_text()
    assert read_front_matter(card) == {
        "base_model": "builtin:tiny", "library_name": "peft", "license": "other", "pipeline_tag": "text-generation",
        "tags": ["align", "sft", "lora"], "datasets": [FINGERPRINT],
    }
    assert re.findall(r"^## (.+)$", card, flags=re.MULTILINE) == SECTIONS
    assert "[More Information Needed]" not in card  # peft's template
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["README.md"]["sha256"] == sha256_file(folder / "README.md")
    assert manifest["base_model"] == "builtin:tiny"
    ArtifactStore(str(tmp_path / "artifacts")).verify(artifact.uri)

    expected = logits(trained)
    for reference in (artifact.ref, folder):
        loaded, tokenizer = load_artifact(reference, artifact_root=str(tmp_path / "artifacts"))
        assert tokenizer.eos_token == "<|end|>"
        torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-6)

    # The next stage continues the policy: same outputs before it trains.
    _, next_policy = load_policy(job, folder, torch.float32)
    torch.testing.assert_close(logits(next_policy.eval()), expected, rtol=0, atol=1e-6)


def test_a_relative_base_model_path_is_recorded_absolute_and_loads_from_elsewhere(small_model, tmp_path, monkeypatch):
    monkeypatch.chdir(small_model.parent)
    job = job_spec(small_model.name)
    trained, folder, artifact = publish_trained_adapter(stage_context(job, 0, tmp_path))

    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(small_model)
    assert read_front_matter((folder / "README.md").read_text())["base_model"] == str(small_model)
    assert artifact.manifest.base_model == small_model.name  # the spec's own text, as hashed in spec_hash

    monkeypatch.chdir(tmp_path)
    assert not os.path.exists(small_model.name)
    loaded, _ = load_artifact(folder)
    torch.testing.assert_close(logits(loaded), logits(trained), rtol=0, atol=1e-6)


def test_a_published_reward_model_loads_back_with_its_head(small_model, tmp_path):
    job = job_spec(str(small_model), stages=[{"type": "rm", "data": {"path": "/data/prefs.jsonl"}, "max_steps": 2}])
    ctx = stage_context(job, 0, tmp_path)
    tokenizer, model = load_reward_model_for(ctx.job, None, ctx.dtype)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the LoRA matrices and the score head
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    result = publish(ctx, model, tokenizer, Rank(0, 1, 0), kind="reward_model", metrics={},
                            fingerprints={"train": FINGERPRINT})
    folder = Path(result.artifact.uri)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(small_model)
    assert read_front_matter((folder / "README.md").read_text())["pipeline_tag"] == "text-classification"

    loaded, _ = load_artifact(result.artifact.ref, artifact_root=str(tmp_path / "artifacts"))
    torch.testing.assert_close(logits(loaded), logits(model.eval()), rtol=0, atol=1e-6)
    assert logits(loaded).shape == (1, 1)


def test_load_artifact_names_a_missing_folder_and_a_missing_base_model(tmp_path):
    from align.models.load import ModelError

    expected = "artifact '.*nowhere' is not a folder; give artifact:<id> or an artifact's folder"
    with pytest.raises(ModelError, match=expected):
        load_artifact(tmp_path / "nowhere")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone/llama"}))
    with pytest.raises(ModelError, match=r"adapter: the base model its adapter_config.json names: "
                                         r"base_model: '/gone/llama' is not a local model folder"):
        load_artifact(tmp_path / "adapter")
