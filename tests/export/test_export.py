"""``align export``: merged weights give the logits of base plus adapter, and the folder loads without align.

Tolerances: merged fp32 weights against peft's base + adapter in fp32, max |Δlogit| ≤ 1e-4 (logits are of
order 1-10; merging only reorders the sums). Merged weights saved in bf16 against the same fp32 reference:
max |Δlogit| ≤ 0.05 · max |logit| (bf16 keeps 8 significant bits: ~0.4% per weight).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, prompt_logits, publish_random_adapter
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from align.artifacts import ArtifactStore
from align.export import ExportError, card_quantization, export_artifact
from align.model_card import read_front_matter, write_model_card
from align.models.load import load_causal_lm, load_tokenizer
from align.spec import parse_spec
from services.cli import app

FP32_ATOL = 1e-4

NO_ALIGN_LOADER = r"""
import json, sys
sys.modules["align"] = None  # any import of align fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
prompts = json.loads(sys.argv[3])
batch = tokenizer(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits[batch["attention_mask"].bool()].float()
try:
    import align  # noqa: F401
    importable = True
except ImportError:
    importable = False
torch.save({"logits": logits, "chat_template": tokenizer.chat_template, "align_importable": importable,
            "architectures": model.config.architectures, "dtype": str(model.dtype),
            "rendered": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)}, out)
"""


def _job(base: Path, name: str, adapter: str = "lora", **overrides):
    return parse_spec({"name": name, "base_model": str(base), "adapter": {"type": adapter, "r": 4, "alpha": 8,
                                                                            "dropout": 0.0},
                       "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}}], **overrides})


def _peft_logits(base: Path, folder: Path, quantization=None) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_causal_lm(base, torch.float32, quantization), folder).eval()
    return prompt_logits(model, load_tokenizer(base))


def _export_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return prompt_logits(model, load_tokenizer(folder))


def test_merged_export_of_job_twos_dpo_loads_without_align_and_matches_peft(chain, small_model, tmp_path):
    """The chain's DPO artifact, exported by the CLI with --merge, loads in a Python that cannot import align;
    its logits on 16 prompts are peft's base + adapter in fp32, and the card carries the cross-job lineage."""
    dest = tmp_path / "merged"
    result = CliRunner().invoke(app, ["export", chain.dpo.artifact.artifact_id, str(dest), "--merge",
                                      "--artifact-root", chain.root])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json",
    ]
    out = tmp_path / "loaded.pt"
    subprocess.run([sys.executable, "-I", "-c", NO_ALIGN_LOADER, str(dest), str(out), json.dumps(PROMPTS)],
                   check=True, cwd=tmp_path)
    loaded = torch.load(out)
    assert loaded["align_importable"] is False
    assert loaded["architectures"] == ["LlamaForCausalLM"] and loaded["dtype"] == "torch.float32"
    artifact_tokenizer = load_tokenizer(Path(chain.dpo.artifact.uri))
    assert loaded["chat_template"] == artifact_tokenizer.chat_template
    assert loaded["rendered"] == artifact_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

    reference = _peft_logits(small_model, Path(chain.dpo.artifact.uri))
    torch.testing.assert_close(loaded["logits"], reference, rtol=0, atol=FP32_ATOL)
    base = prompt_logits(AutoModelForCausalLM.from_pretrained(small_model), load_tokenizer(small_model))
    assert (reference - base).abs().max() > 100 * FP32_ATOL, "the adapter changes the model"

    card = (dest / "README.md").read_text()
    meta = read_front_matter(card)
    assert meta["base_model"] == str(small_model) and meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]
    assert f"- artifact: `{chain.dpo.artifact.artifact_id}`" in card
    assert f"- parents: `artifact:{chain.sft.artifact.artifact_id}`" in card
    assert "## Final metrics" in card and "| dpo_loss |" in card

    # bf16 weights: the same logits within bf16's precision.
    bf16 = export_artifact(Path(chain.dpo.artifact.uri), tmp_path / "bf16", merge=True, dtype="bf16")
    assert {t.dtype for t in load_file(bf16 / "model.safetensors").values()} == {torch.bfloat16}
    torch.testing.assert_close(_export_logits(bf16), reference, rtol=0, atol=0.05 * reference.abs().max().item())


def test_adapter_export_loads_with_peft(chain, small_model, tmp_path):
    dest = export_artifact(Path(chain.dpo.artifact.uri), tmp_path / "adapter")
    assert sorted(p.name for p in dest.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert read_front_matter((dest / "README.md").read_text())["base_model_relation"] == "adapter"
    torch.testing.assert_close(_peft_logits(small_model, dest), _peft_logits(small_model, Path(chain.dpo.artifact.uri)),
                               rtol=0, atol=0)


def test_dora_merge_matches_peft(small_model, tmp_path):
    artifact = publish_random_adapter(_job(small_model, "dora", "dora"), small_model, tmp_path / "artifacts")
    dest = export_artifact(Path(artifact.uri), tmp_path / "merged", merge=True)
    torch.testing.assert_close(_export_logits(dest), _peft_logits(small_model, Path(artifact.uri)),
                               rtol=0, atol=FP32_ATOL)


def test_qlora_merge_uses_the_dequantised_base(small_model, tmp_path):
    """A QLoRA adapter is merged into the 4-bit base dequantised: the export computes what the adapter on the
    4-bit base computes, which differs from the adapter on the full-precision base."""
    pytest.importorskip("bitsandbytes")
    job = _job(small_model, "qlora", quantization={"bits": 4, "type": "nf4", "double_quant": True})
    artifact = publish_random_adapter(job, small_model, tmp_path / "artifacts")
    assert card_quantization(Path(artifact.uri)) == job.quantization
    dest = export_artifact(Path(artifact.uri), tmp_path / "merged", merge=True)
    exported = _export_logits(dest)
    torch.testing.assert_close(exported, _peft_logits(small_model, Path(artifact.uri), job.quantization),
                               rtol=0, atol=FP32_ATOL)
    assert (exported - _peft_logits(small_model, Path(artifact.uri))).abs().max() > 100 * FP32_ATOL
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())


def test_qlora_merge_quantises_the_base_in_the_dtype_it_trained_in(small_model, tmp_path):
    """A stage training in bf16 loads the base in bf16 and quantises those weights; quantising the fp32
    weights instead picks other 4-bit codes for some of them. The export merges into the dequantised bf16
    quantisation, the weights the adapter trained on: its fp32 logits are peft's on that base."""
    pytest.importorskip("bitsandbytes")
    job = _job(small_model, "qlora", quantization={"bits": 4, "type": "nf4", "double_quant": True})
    artifact = publish_random_adapter(job, small_model, tmp_path / "artifacts", precision="bf16")
    dest = export_artifact(Path(artifact.uri), tmp_path / "merged", merge=True, dtype="fp32")
    trained_on = load_causal_lm(small_model, torch.bfloat16, job.quantization).dequantize().float()
    reference = prompt_logits(PeftModel.from_pretrained(trained_on, Path(artifact.uri)).eval(),
                              load_tokenizer(small_model))
    exported = _export_logits(dest)
    torch.testing.assert_close(exported, reference, rtol=0, atol=FP32_ATOL)
    fp32_quantised = _peft_logits(small_model, Path(artifact.uri), job.quantization)
    assert (exported - fp32_quantised).abs().max() > 100 * FP32_ATOL


def test_full_fine_tune_exports_its_weights(small_model, tmp_path):
    job = _job(small_model, "whole", "full")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(small_model)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight) * 0.1)
    out = tmp_path / "out"
    model.save_pretrained(out)
    load_tokenizer(small_model).save_pretrained(out)
    write_model_card(out, job, 0, kind="full", lineage="whole.sft", parents=[], data_fingerprints={}, metrics={},
                     precision=None)
    artifact = ArtifactStore(tmp_path / "artifacts").publish(
        out, lineage="whole.sft", kind="full", stage={"type": "sft", "index": 0, "name": "sft"},
        base_model=str(small_model), spec_hash=job.hash(), job={"id": None, "name": "whole"})
    dest = export_artifact(Path(artifact.uri), tmp_path / "export", merge=True)
    assert (dest / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert not (dest / "manifest.json").exists()
    assert read_front_matter((dest / "README.md").read_text())["base_model_relation"] == "finetune"
    torch.testing.assert_close(_export_logits(dest), prompt_logits(model.eval(), load_tokenizer(small_model)),
                               rtol=0, atol=0)


def test_bad_exports_are_refused(chain, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="is not empty"):
        export_artifact(Path(chain.dpo.artifact.uri), tmp_path / "full")
    with pytest.raises(ExportError, match="dtype: 'int8' is not one of auto, fp32, bf16, fp16"):
        export_artifact(Path(chain.dpo.artifact.uri), tmp_path / "d", dtype="int8")
    result = CliRunner().invoke(app, ["export", "nope.sft-v1-0123456789ab", str(tmp_path / "e"),
                                      "--artifact-root", chain.root, "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach the service" in result.output
    assert not (tmp_path / "e").exists()


def test_folders_that_hold_no_policy_are_refused(small_model, tmp_path):
    """A folder with no manifest (a stage's output before it is published) is known by its files, as
    ``load_artifact`` reads it: an adapter for sequence classification is a reward model and is not exported;
    a folder with no model at all is not an artifact."""
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS", "base_model_name_or_path":
                                                            str(small_model), "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    load_tokenizer(small_model).save_pretrained(folder)
    with pytest.raises(ExportError, match="is a reward model; export exports policies"):
        export_artifact(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ExportError, match="is not an artifact's folder: it holds no manifest.json"):
        export_artifact(tmp_path / "notes", tmp_path / "out")
