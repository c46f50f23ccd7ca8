"""Artifact store faults: a publish interrupted at any file (an error, or the process dying) leaves no
manifest and the next attempt publishes anew; an artifact whose files differ from its manifest is refused
on download and on export (library, `align export`, and the API's export route)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from align.artifacts import MANIFEST, ArtifactError, ArtifactStore
from align.cli import app as cli_app
from services.app import create_app
from services.db import auth, transitions
from services.db.artifacts import record_artifact
from services.settings import Settings

FILES = {"adapter_model.safetensors": b"weights" * 4000, "adapter_config.json": b'{"r": 8}',
         "README.md": b"# card\n", "tokenizer/tokenizer.json": b'{"model": {}}'}


class Killed(BaseException):
    """The process dies here: no ``except Exception`` clean-up runs after it."""


def stage_output(root: Path) -> Path:
    out = root / "out"
    for relative, data in FILES.items():
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
    return out


def publish(store: ArtifactStore, out: Path, attempt: int = 1):
    stage = {"type": "sft", "index": 0, "name": "sft", "stage_run_id": "sr_1", "attempt": attempt}
    return store.publish(out, lineage="faults.sft", kind="adapter", stage=stage, base_model="builtin:tiny",
                         spec_hash="sha256:spec", metrics={"loss": 0.5})


def fail_at(monkeypatch, index: int, error: BaseException) -> list[str]:
    """Make the ``index``-th file upload of the next publish raise ``error``; returns the files attempted."""
    attempted: list[str] = []
    upload = ArtifactStore._upload

    def failing(self, source, version_path, relative):
        attempted.append(relative)
        if len(attempted) - 1 == index:
            raise error
        return upload(self, source, version_path, relative)

    monkeypatch.setattr(ArtifactStore, "_upload", failing)
    return attempted


def manifests_under(root: Path) -> list[Path]:
    return sorted(root.rglob(MANIFEST))


@pytest.mark.parametrize("error", [OSError("disk full"), Killed()], ids=["error", "killed"])
@pytest.mark.parametrize("index", range(len(FILES)))
def test_a_publish_interrupted_at_any_file_leaves_no_manifest_and_the_retry_publishes(
    tmp_path, monkeypatch, index, error
):
    root = tmp_path / "artifacts"
    store, out = ArtifactStore(root), stage_output(tmp_path)
    with monkeypatch.context() as patch:
        attempted = fail_at(patch, index, error)
        with pytest.raises(type(error)):
            publish(store, out)
    assert len(attempted) == index + 1
    assert manifests_under(root) == [] and store.list_versions("faults.sft") == []
    assert store.latest("faults.sft") is None and store.published_by("faults.sft", "sr_1", 1) is None
    with pytest.raises(ArtifactError, match="no manifest.json"):
        store.get(str(root / "faults.sft" / "v1"))

    # The same attempt run again (its report never reached the service) and the next attempt both publish.
    again = publish(store, out)
    retry = publish(store, out, attempt=2)
    assert (again.manifest.version, retry.manifest.version) == (2, 3), "a version number is never reused"
    assert store.list_versions("faults.sft") == [2, 3]
    assert manifests_under(root) == [root / "faults.sft" / f"v{n}" / MANIFEST for n in (2, 3)]
    for published in (again, retry):
        store.verify(published.uri)
        assert set(published.manifest.files) == set(FILES)


def test_a_failed_manifest_write_leaves_no_manifest(tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    store, out = ArtifactStore(root), stage_output(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(ArtifactStore, "_write_manifest", lambda *_: (_ for _ in ()).throw(OSError("no space")))
        with pytest.raises(OSError):
            publish(store, out)
    assert manifests_under(root) == [] and store.list_versions("faults.sft") == []
    assert publish(store, out).manifest.version == 2


def flip_bytes(folder: Path) -> str:
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    return "adapter_model.safetensors: sha256"


def truncate(folder: Path) -> str:
    path = folder / "adapter_config.json"
    path.write_bytes(path.read_bytes()[:3])
    return "adapter_config.json: size 3"


def edit_manifest(folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["README.md"]["sha256"] = "0" * 64
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return "content_hash"


def add_file(folder: Path) -> str:
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return "pytorch_model.bin: extra file"


def remove_file(folder: Path) -> str:
    (folder / "tokenizer" / "tokenizer.json").unlink()
    return "tokenizer/tokenizer.json: missing"


DAMAGE = {"bytes flipped": flip_bytes, "file truncated": truncate, "manifest edited": edit_manifest,
          "extra file": add_file, "file removed": remove_file}


@pytest.fixture(params=DAMAGE, ids=[name.replace(" ", "-") for name in DAMAGE])
def damaged(request, tmp_path):
    """A published artifact, then damaged; yields (store, published, what the refusal must name)."""
    store = ArtifactStore(tmp_path / "artifacts")
    published = publish(store, stage_output(tmp_path))
    store.verify(published.uri)
    named = DAMAGE[request.param](Path(published.uri))
    return store, published, named


def test_a_damaged_artifact_is_refused_on_download(damaged, tmp_path):
    store, published, named = damaged
    reference = f"artifact:{published.manifest.artifact_id}"
    with pytest.raises(ArtifactError, match=named):
        store.verify(published.uri)
    with pytest.raises(ArtifactError, match=named):
        store.download(reference)  # a local store hands out its own folder only once it is verified
    copy = tmp_path / "copy"
    with pytest.raises(ArtifactError, match=named.split(":")[0]):
        store.download(reference, copy)
    assert not copy.exists() or not any(copy.iterdir()), "nothing half-copied is left behind"


def test_a_damaged_artifact_is_refused_by_align_export(damaged, tmp_path):
    store, published, named = damaged
    runner = CliRunner()
    by_id = runner.invoke(cli_app, ["export", published.manifest.artifact_id, str(tmp_path / "by-id"),
                                    "--artifact-root", str(store.root_uri)])
    by_folder = runner.invoke(cli_app, ["export", published.uri, str(tmp_path / "by-folder")])
    for result in (by_id, by_folder):
        assert result.exit_code == 2, result.output
        assert named.split(":")[0] in " ".join(result.output.split())
        assert "fetching it from the service" not in result.output
    assert not (tmp_path / "by-id").exists() and not (tmp_path / "by-folder").exists()


def test_a_damaged_artifact_is_refused_by_the_export_route(tmp_path, session_factory, database_url):
    data = tmp_path / "data"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text(json.dumps(row) + "\n")
    settings = Settings(database_url=database_url, artifact_root=str(tmp_path / "artifacts"),
                        work_root=str(tmp_path / "work"), data_roots=[str(data)], model_roots=[str(data)],
                        report_secret="store-faults", run_dispatcher=False)
    store = ArtifactStore(settings.artifact_root)
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        with session_factory.begin() as session:
            tenant = auth.create_tenant(session, "alice")
            _, key = auth.create_api_key(session, tenant.id, "test")
        client.headers["Authorization"] = f"Bearer {key}"
        spec = {"name": "faults", "base_model": "builtin:tiny",
                "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 1}]}
        job = client.post("/jobs", json=spec).json()
        with session_factory.begin() as session:
            run = transitions.claim_next(session, "test-owner", 300)
            published = publish(store, stage_output(tmp_path))
            manifest = published.manifest
            record_artifact(session, job["id"], run.id, run.attempt, {
                "artifact_id": manifest.artifact_id, "uri": published.uri, "lineage": manifest.lineage,
                "version": manifest.version, "kind": manifest.kind, "manifest_hash": "sha256:00"})
        flip_bytes(Path(published.uri))
        answer = client.get(f"/artifacts/{manifest.artifact_id}/export")
    assert answer.status_code == 422, answer.text
    assert "adapter_model.safetensors: sha256" in answer.text and "artifact_id" in answer.text
    assert not list((tmp_path / "work").rglob("*.tar"))
