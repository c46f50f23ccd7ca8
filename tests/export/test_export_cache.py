"""The export archive of ``GET /artifacts/{id}/export``: built once, however many requests ask at once."""

from __future__ import annotations

import tarfile
import threading
from pathlib import Path

from helpers import publish_random_adapter

import align.export
from align.export import export_archive
from align.spec import parse_spec


def test_concurrent_requests_build_the_archive_once(small_model, tmp_path, monkeypatch):
    """A second request for an archive being built waits for that build and gets its archive: the model is
    loaded and merged once, and no half-written archive or scratch folder is left in the cache."""
    job = parse_spec({"name": "cached", "base_model": str(small_model), "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
                      "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}}]})
    artifact = publish_random_adapter(job, small_model, tmp_path / "artifacts")
    cache, name = tmp_path / "exports", artifact.artifact_id
    build, builds = align.export.export_artifact, []
    first_started, release_first = threading.Event(), threading.Event()

    def counted_build(*args, **kwargs):
        builds.append(args[1])
        if len(builds) == 1:
            first_started.set()
            release_first.wait(30)
        return build(*args, **kwargs)

    monkeypatch.setattr(align.export, "export_artifact", counted_build)
    archives = []

    def request() -> None:
        archives.append(export_archive(Path(artifact.uri), cache, name))

    first, second = threading.Thread(target=request), threading.Thread(target=request)
    first.start()
    assert first_started.wait(30)
    second.start()
    second.join(1.0)  # long enough for a second build to start, had it not waited for the first
    release_first.set()
    first.join(300)
    second.join(300)

    assert len(builds) == 1
    assert archives == [cache / f"{name}.tar"] * 2
    with tarfile.open(archives[0]) as tar:
        assert {f"{name}/model.safetensors", f"{name}/config.json", f"{name}/README.md"} <= set(tar.getnames())
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [f"{name}.tar"]
