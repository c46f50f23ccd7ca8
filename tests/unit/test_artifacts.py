"""Artifact store: file sets, manifests, version numbering, completeness marker, verification, peft round trip."""

import hashlib
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from align.artifacts import (
    ARTIFACT_SCHEMA_VERSION,
    MANIFEST,
    ArtifactError,
    ArtifactStore,
    content_hash,
    sha256_file,
)

STAGE_FILES = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "metrics.jsonl"}


def write_stage_output(directory: Path, seed: int = 0) -> Path:
    """A stand-in for what a stage writes: safetensors weights, configs, tokenizer, metrics."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {"base_model.model.layers.0.lora_A.weight": torch.randn(2, 8, generator=generator)},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}, "added_tokens": []}))
    (directory / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.5}\n')
    return directory


def publish(store: ArtifactStore, source: Path, lineage: str = "support-bot-sft", **overrides):
    arguments = {
        "lineage": lineage,
        "kind": "adapter",
        "stage": {"type": "sft", "index": 0, "name": "sft"},
        "base_model": "builtin:tiny",
        "spec_hash": "sha256:" + hashlib.sha256(b"support-bot").hexdigest(),
        "job": {"id": "job-1", "name": "support-bot"},
    }
    return store.publish(source, **(arguments | overrides))


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def stage_output(tmp_path: Path) -> Path:
    return write_stage_output(tmp_path / "out")


def test_publish_writes_exact_file_set_and_manifest(store, stage_output):
    artifact = publish(
        store, stage_output, parents=["artifact:base-v1-0123456789ab"],
        data_fingerprints={"sft": "sha256:abc"}, metrics={"loss": 0.5},
    )

    version_dir = Path(artifact.uri)
    assert version_dir == Path(store.root_uri) / "support-bot-sft" / "v1"
    assert files_under(version_dir) == STAGE_FILES | {MANIFEST}
    on_disk = json.loads((version_dir / MANIFEST).read_text())
    assert on_disk == artifact.manifest.to_dict()

    manifest = artifact.manifest
    assert manifest.schema_version == ARTIFACT_SCHEMA_VERSION
    assert (manifest.lineage, manifest.version, manifest.kind) == ("support-bot-sft", 1, "adapter")
    assert manifest.stage == {"type": "sft", "index": 0, "name": "sft"}
    assert manifest.job == {"id": "job-1", "name": "support-bot"}
    assert manifest.parents == ["artifact:base-v1-0123456789ab"]
    assert manifest.base_model == "builtin:tiny"
    assert manifest.data_fingerprints == {"sft": "sha256:abc"}
    assert manifest.metrics == {"loss": 0.5}
    assert set(manifest.code_version) == {"align", "git_commit"}
    created_at = datetime.fromisoformat(manifest.created_at)
    assert created_at.utcoffset() == timedelta(0)

    assert set(manifest.files) == STAGE_FILES
    for name, entry in manifest.files.items():
        source_bytes = (stage_output / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(source_bytes).hexdigest(), "size": len(source_bytes)}
        assert sha256_file(version_dir / name) == entry["sha256"]

    # Identity: sha256 over "path NUL sha256 LF" lines sorted by path.
    lines = "".join(f"{name}\0{manifest.files[name]['sha256']}\n" for name in sorted(manifest.files))
    assert manifest.content_hash == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert manifest.content_hash == content_hash(manifest.files)
    assert manifest.artifact_id == f"support-bot-sft-v1-{manifest.content_hash[len('sha256:'):][:12]}"
    store.verify(artifact.uri)


def test_nested_files_keep_their_relative_paths(store, stage_output):
    (stage_output / "tokenizer").mkdir()
    (stage_output / "tokenizer" / "chat_template.jinja").write_text("{{ messages }}")
    artifact = publish(store, stage_output)
    assert "tokenizer/chat_template.jinja" in artifact.manifest.files
    assert (Path(artifact.uri) / "tokenizer" / "chat_template.jinja").read_text() == "{{ messages }}"


def test_versions_count_up_per_lineage_independently(store, tmp_path):
    published = []
    for index, lineage in enumerate(["job-sft", "job-sft", "job-dpo", "job-sft", "job-dpo"]):
        source = write_stage_output(tmp_path / f"out{index}", seed=index)
        published.append((lineage, publish(store, source, lineage=lineage).manifest.version))
    assert published == [("job-sft", 1), ("job-sft", 2), ("job-dpo", 1), ("job-sft", 3), ("job-dpo", 2)]
    assert store.list_versions("job-sft") == [1, 2, 3]
    assert store.list_versions("job-dpo") == [1, 2]
    assert store.latest("job-sft").manifest.version == 3
    assert store.list_versions("never-published") == []
    assert store.latest("never-published") is None


def test_identical_content_still_gets_a_new_version(store, stage_output):
    first = publish(store, stage_output)
    second = publish(store, stage_output)
    assert first.manifest.content_hash == second.manifest.content_hash
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert first.artifact_id != second.artifact_id


def test_incomplete_version_is_invisible_and_never_reused(store, stage_output):
    publish(store, stage_output)
    incomplete = Path(store.root_uri) / "support-bot-sft" / "v2"
    incomplete.mkdir()
    (incomplete / "adapter_model.safetensors").write_bytes(b"half an upload")

    assert store.list_versions("support-bot-sft") == [1]
    assert store.latest("support-bot-sft").manifest.version == 1
    with pytest.raises(ArtifactError, match="no manifest.json"):
        store.get(str(incomplete))

    third = publish(store, stage_output)
    assert third.manifest.version == 3
    assert files_under(incomplete) == {"adapter_model.safetensors"}
    assert (incomplete / "adapter_model.safetensors").read_bytes() == b"half an upload"
    assert store.list_versions("support-bot-sft") == [1, 3]


def test_failed_upload_burns_its_version_number(store, stage_output, monkeypatch):
    def fail_writing_manifest(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_write_manifest", fail_writing_manifest)
    with pytest.raises(OSError, match="disk full"):
        publish(store, stage_output)
    monkeypatch.undo()
    assert store.list_versions("support-bot-sft") == []
    assert files_under(Path(store.root_uri)) == set()  # copied files removed, the empty v1 claim stays
    assert publish(store, stage_output).manifest.version == 2


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda d: (d / "tokenizer.json").write_text('{"model": {"type": "BPX"}, "added_tokens": []}'),
         r"tokenizer\.json: sha256"),
        (lambda d: (d / "metrics.jsonl").write_text("{}\n"), r"metrics\.jsonl: size"),
        (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config\.json: missing"),
        (lambda d: (d / "notes.txt").write_text("hi"), r"notes\.txt: extra file"),
    ],
    ids=["same-size-edit", "size-change", "missing", "extra"],
)
def test_verify_names_the_tampered_file(store, stage_output, tamper, expected):
    artifact = publish(store, stage_output)
    tamper(Path(artifact.uri))
    with pytest.raises(ArtifactError, match=expected):
        store.verify(artifact.uri)
    with pytest.raises(ArtifactError, match=expected):
        store.download(artifact.uri)


def test_get_resolves_artifact_id_and_uri(store, tmp_path):
    # A lineage that itself looks like "<name>-v<N>" must still resolve.
    publish(store, write_stage_output(tmp_path / "a", seed=1), lineage="ppo-v2")
    second = publish(store, write_stage_output(tmp_path / "b", seed=2), lineage="ppo-v2")

    assert store.get(second.ref) == second
    assert store.get(second.uri) == second
    assert store.get(second.uri + "/") == second
    assert store.get("file://" + second.uri) == second

    with pytest.raises(ArtifactError, match="no artifact"):
        store.get(f"artifact:ppo-v2-v2-{'0' * 12}")
    with pytest.raises(ArtifactError, match="no artifact"):
        store.get(f"artifact:ppo-v2-v9-{'0' * 12}")
    with pytest.raises(ArtifactError, match="not an artifact reference"):
        store.get("artifact:nonsense")
    with pytest.raises(ArtifactError, match="not inside this artifact store"):
        store.get(str(tmp_path / "elsewhere" / "x" / "v1"))
    with pytest.raises(ArtifactError, match="not an artifact version directory"):
        store.get(str(Path(store.root_uri) / "ppo-v2"))


def test_concurrent_publishes_get_distinct_versions(store, tmp_path):
    sources = [write_stage_output(tmp_path / f"out{i}", seed=i) for i in range(4)]
    start = threading.Barrier(4)

    def publish_after_barrier(source):
        start.wait()
        return publish(store, source).manifest.version

    with ThreadPoolExecutor(max_workers=4) as pool:
        versions = list(pool.map(publish_after_barrier, sources))
    assert sorted(versions) == [1, 2, 3, 4]
    assert store.list_versions("support-bot-sft") == [1, 2, 3, 4]
    for version in versions:
        store.verify(str(Path(store.root_uri) / "support-bot-sft" / f"v{version}"))


@pytest.mark.parametrize("lineage", ["a/b", "..", "a..b", "../etc", "has space", "", "ünï", ".hidden", "x" * 201])
def test_bad_lineage_names_are_rejected(store, stage_output, lineage):
    with pytest.raises(ValueError, match="lineage"):
        publish(store, stage_output, lineage=lineage)
    with pytest.raises(ValueError, match="lineage"):
        store.list_versions(lineage)
    assert not Path(store.root_uri).exists() or files_under(Path(store.root_uri)) == set()


def test_bad_publish_arguments_are_rejected(store, stage_output, tmp_path):
    with pytest.raises(ValueError, match="kind 'lora'"):
        publish(store, stage_output, kind="lora")
    with pytest.raises(ValueError, match="stage"):
        publish(store, stage_output, stage={"type": "sft"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        publish(store, tmp_path / "empty")
    (stage_output / MANIFEST).write_text("{}")
    with pytest.raises(ValueError, match="already holds manifest.json"):
        publish(store, stage_output)
    assert store.list_versions("support-bot-sft") == []


def test_download_copies_and_verifies(store, stage_output, tmp_path):
    artifact = publish(store, stage_output)
    assert store.download(artifact.uri) == Path(artifact.uri)  # local store: no copy

    target = store.download(artifact.ref, tmp_path / "copy")
    assert files_under(target) == STAGE_FILES | {MANIFEST}
    for name in STAGE_FILES:
        assert (target / name).read_bytes() == (stage_output / name).read_bytes()
    assert store.download(artifact.uri, target) == target  # an intact copy is reused

    (target / "tokenizer.json").write_text("{}")
    with pytest.raises(ArtifactError, match="tokenizer.json"):
        store.download(artifact.uri, target)
    other = tmp_path / "occupied"
    other.mkdir()
    (other / "something").write_text("x")
    with pytest.raises(ArtifactError, match="not empty"):
        store.download(artifact.uri, other)


def test_store_works_on_a_non_local_fsspec_filesystem(stage_output, tmp_path, monkeypatch):
    root = f"memory://align-tests-{uuid.uuid4().hex}/artifacts"
    store = ArtifactStore(root)
    try:
        first = publish(store, stage_output)
        second = publish(store, stage_output)
        assert first.uri.startswith("memory://") and first.uri.endswith("/artifacts/support-bot-sft/v1")
        assert store.get(first.uri) == first
        assert store.list_versions("support-bot-sft") == [1, 2]
        fs = fsspec.filesystem("memory")
        lineage_dir = root.removeprefix("memory:/") + "/support-bot-sft"
        assert {p.rsplit("/", 1)[1] for p in fs.ls(lineage_dir, detail=False)} == {"v1", "v1.claim", "v2", "v2.claim"}
        store.verify(second.ref)

        monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "cache"))
        cached = store.download(second.ref)
        assert cached == tmp_path / "cache" / "artifacts" / second.artifact_id
        assert files_under(cached) == STAGE_FILES | {MANIFEST}
        assert store.download(second.ref) == cached
    finally:
        fsspec.filesystem("memory").rm(root.removeprefix("memory:/").split("/")[1], recursive=True)


def test_peft_adapter_round_trips_through_the_store(store, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )

    def fresh_base():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    # init_lora_weights=False gives non-zero B, so equal weights mean they really were loaded.
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    trained = get_peft_model(fresh_base(), lora)
    trained.save_pretrained(tmp_path / "adapter")

    artifact = publish(store, tmp_path / "adapter", lineage="tiny-sft")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(artifact.manifest.files)
    local = store.download(artifact.ref, tmp_path / "downloaded")

    loaded = PeftModel.from_pretrained(fresh_base(), local)
    expected = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    actual = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert len(expected) == 4  # q_proj and v_proj, A and B, one layer
    assert expected.keys() == actual.keys()
    for name, weight in expected.items():
        assert torch.equal(weight, actual[name]), name
