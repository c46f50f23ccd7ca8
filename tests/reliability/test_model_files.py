"""A base model holding a pickle is refused before it is queued: POST /jobs and ``align validate`` read the
safetensors header of every weight file (8 bytes of length, then JSON), never the tensors. A folder with
only ``pytorch_model.bin``, a pickle renamed ``model.safetensors``, a shard index naming a pickle, a missing
shard or a file outside the folder, and an ``artifact:`` base whose weights are a pickle: each is a 422 on
``base_model``, on SQLite and Postgres."""

from __future__ import annotations

import io
import json
import pickle
import struct
import time

import pytest
import torch
import yaml
from safetensors.torch import save, save_file
from tenants import fields, job_spec, model_folder, record_artifact, two_tenant_service
from typer.testing import CliRunner

from align.models.weights import MAX_HEADER_BYTES, header_problem
from services.cli import app


def torch_pickle(new_format: bool = True) -> bytes:
    """What ``torch.save`` writes for a state dict: a zip of pickles, or (old format) a bare pickle stream."""
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer, _use_new_zipfile_serialization=new_format)
    return buffer.getvalue()


def with_header(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


REAL = save({"w": torch.ones(4), "b": torch.zeros(2, dtype=torch.bfloat16)})
NOT_SAFETENSORS = {
    "torch.save (zip)": torch_pickle(),
    "torch.save (legacy pickle)": torch_pickle(new_format=False),
    "pickle.dumps": pickle.dumps({"w": [1.0, 2.0]}),
    "empty": b"",
    "seven bytes": b"\x02\x00\x00\x00\x00\x00\x00",
    "header longer than the file": with_header(b"{}", length=1000),
    "header over the limit": with_header(b"{}", length=MAX_HEADER_BYTES + 1),
    "header not JSON": with_header(b"\x80\x02}q\x00."),
    "header a list": with_header(b"[1, 2]"),
    "header not UTF-8": with_header(b'{"\xff": 1}'),
    "tensor past the end": with_header(b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8),
    "offsets reversed": with_header(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}', b"\0" * 4),
    "no dtype": with_header(b'{"w": {"shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
    "tensor not an object": with_header(b'{"w": 7}'),
}


def test_the_header_check_tells_safetensors_from_pickles_and_broken_files():
    assert header_problem(io.BytesIO(REAL), len(REAL)) is None
    metadata_only = with_header(b'{"__metadata__": {"format": "pt"}}')
    assert header_problem(io.BytesIO(metadata_only), len(metadata_only)) is None
    for name, content in NOT_SAFETENSORS.items():
        problem = header_problem(io.BytesIO(content), len(content))
        assert problem is not None, name
    # A 2 GB file's header is read in a fraction of a millisecond: only the first 8 bytes and the JSON.
    started = time.perf_counter()
    for _ in range(100):
        header_problem(io.BytesIO(REAL), 2 << 30)
    assert time.perf_counter() - started < 0.5


def shard_index(*names: str) -> str:
    return json.dumps({"metadata": {}, "weight_map": {f"t{i}": name for i, name in enumerate(names)}})


REFUSED_FOLDERS = {
    "only-bin": ({"pytorch_model.bin": torch_pickle()}, "has no *.safetensors weights (found pytorch_model.bin"),
    "renamed": ({"model.safetensors": torch_pickle()}, "model.safetensors does not start with a safetensors header"),
    "renamed-legacy": ({"model.safetensors": torch_pickle(new_format=False)}, "does not start with a safetensors"),
    "truncated": ({"model.safetensors": REAL[:-4]}, "malformed or lies outside the file"),
    "shard-pickle": ({"model.safetensors.index.json": shard_index("a.safetensors", "b.safetensors"),
                      "a.safetensors": REAL, "b.safetensors": torch_pickle()}, "b.safetensors does not start with"),
    "shard-missing": ({"model.safetensors.index.json": shard_index("a.safetensors", "c.safetensors"),
                       "a.safetensors": REAL}, "names c.safetensors, which the folder does not hold"),
    "shard-outside": ({"model.safetensors.index.json": shard_index("../alice/x.safetensors"),
                       "a.safetensors": REAL}, "each shard must be a *.safetensors file in the model's folder"),
    "shard-bin": ({"model.safetensors.index.json": shard_index("pytorch_model-00001.bin"),
                   "a.safetensors": REAL}, "each shard must be a *.safetensors file"),
    "index-garbage": ({"model.safetensors.index.json": "not json", "a.safetensors": REAL}, "is not a JSON object"),
}
ACCEPTED_FOLDERS = {
    "single": {"model.safetensors": REAL},
    "sharded": {"model.safetensors.index.json": shard_index("a.safetensors", "b.safetensors"),
                "a.safetensors": REAL, "b.safetensors": REAL},
    "with-a-bin-beside": {"model.safetensors": REAL, "pytorch_model.bin": torch_pickle()},  # never loaded
}


def test_post_refuses_a_base_model_holding_a_pickle(tmp_path, database_url, session_factory):
    with two_tenant_service(tmp_path, database_url, session_factory) as service:
        client, alice, models = service.client, service.headers["alice"], service.models["alice"]
        for name, (files, expected) in REFUSED_FOLDERS.items():
            folder = model_folder(models / name, files)
            spec = job_spec("builtin:parity/sft", base_model=str(folder))
            for route in ("/jobs", "/jobs/validate"):
                problems = fields(client.post(route, json=spec, headers=alice))
                assert list(problems) == ["base_model"], (name, problems)
                assert problems["base_model"].startswith(f"'{folder}' ") and expected in problems["base_model"], (
                    name, problems)
                assert "safetensors" in problems["base_model"]
        for name, files in ACCEPTED_FOLDERS.items():
            folder = model_folder(models / name, files)
            response = client.post("/jobs", json=job_spec("builtin:parity/sft", base_model=str(folder)), headers=alice)
            assert response.status_code == 201, (name, response.text)
        assert len(client.get("/jobs", headers=alice).json()["data"]) == len(ACCEPTED_FOLDERS)


def test_post_refuses_an_artifact_base_whose_weights_are_a_pickle(tmp_path, database_url, session_factory):
    """A published policy whose adapter file is a pickle (written into the store by hand, with a manifest
    that matches it) is refused as a base model; the intact one beside it is accepted."""
    with two_tenant_service(tmp_path, database_url, session_factory) as service:
        ids = {}
        for name, weights in (("pickled", torch_pickle()), ("intact", REAL)):
            folder = model_folder(tmp_path / "staging" / name, {"adapter_model.safetensors": weights})
            (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny"}))
            ids[name] = record_artifact(service, "alice", folder, lineage=f"{name}.sft")
        alice = service.headers["alice"]
        problems = fields(service.client.post("/jobs", json=job_spec("builtin:parity/sft",
                                                                     base_model=f"artifact:{ids['pickled']}"),
                                              headers=alice))
        assert problems == {"base_model": f"'artifact:{ids['pickled']}' adapter_model.safetensors does not start with "
                            "a safetensors header (its first 8 bytes give a header of "
                            f"{struct.unpack('<Q', torch_pickle()[:8])[0]} bytes in a file of {len(torch_pickle())}); "
                            "it may be a pickle; align loads safetensors only, never pickles"}
        response = service.client.post("/jobs", json=job_spec("builtin:parity/sft",
                                                               base_model=f"artifact:{ids['intact']}"), headers=alice)
        assert response.status_code == 201, response.text


@pytest.mark.parametrize("name", ["only-bin", "renamed", "shard-outside"])
def test_align_validate_refuses_the_same_folders(tmp_path, name):
    files, expected = REFUSED_FOLDERS[name]
    folder = model_folder(tmp_path / "model", files)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(job_spec("builtin:parity/sft", base_model=str(folder))))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert f"base_model: '{folder}' " in result.output and expected in result.output


def test_align_validate_refuses_an_artifact_base_holding_a_pickle(tmp_path):
    from align.artifacts import ArtifactStore

    folder = model_folder(tmp_path / "full", {"model.safetensors": torch_pickle()})
    store = ArtifactStore(str(tmp_path / "artifacts"))
    published = store.publish(folder, lineage="pickled.sft", kind="full",
                              stage={"type": "sft", "index": 0, "name": "sft"}, base_model="builtin:tiny",
                              spec_hash="sha256:0")
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**job_spec("builtin:parity/sft", base_model=published.ref),
                                    "adapter": {"type": "full"}}))
    result = CliRunner().invoke(app, ["validate", str(spec), "--artifact-root", str(tmp_path / "artifacts")])
    assert result.exit_code == 2, result.output
    assert f"base_model: '{published.ref}' model.safetensors does not start with a safetensors header" in result.output
    save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    intact = store.publish(folder, lineage="intact.sft", kind="full", stage={"type": "sft", "index": 0, "name": "sft"},
                           base_model="builtin:tiny", spec_hash="sha256:0")
    spec.write_text(yaml.safe_dump({**job_spec("builtin:parity/sft", base_model=intact.ref),
                                    "adapter": {"type": "full"}}))
    result = CliRunner().invoke(app, ["validate", str(spec), "--artifact-root", str(tmp_path / "artifacts")])
    assert result.exit_code == 0, result.output
