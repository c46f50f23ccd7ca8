"""Tenants cannot read each other's files, on SQLite and Postgres.

The data and model roots used to default to the serve folder, which holds every tenant's artifacts under
``.align/artifacts/<job>.<stage>/v<N>``: tenant B pointing ``data.path`` at A's ``metrics.jsonl`` got a 422
listing its columns, and "missing column" against "no such file" told B which of A's files exist. Now the
settings keep the artifact and work roots apart from every data and model root (refused at start-up
otherwise), ``{tenant}`` roots give each tenant its own folders, and every way B may name A's files gets
the answer a path that names nothing gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from tenants import fields, job_spec, model_folder, record_artifact, safetensors_bytes, two_tenant_service

from services.paths import location_problem
from services.roots import tenant_roots
from services.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def overlapping(tmp_path: Path) -> list[tuple[dict, set[str]]]:
    """Settings a job could read the artifact or work root through, or one tenant another's folder, each with
    the settings its refusal must name."""
    serve = tmp_path / "serve"
    (serve / "linked").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(serve)
    return [
        # The old defaults: everything under the serve folder.
        ({"data_roots": [str(serve)], "model_roots": [str(serve)], "artifact_root": str(serve / ".align" / "artifacts"),
          "work_root": str(serve / ".align" / "work")},
         {"ALIGN_ARTIFACT_ROOT", "ALIGN_WORK_ROOT", "ALIGN_DATA_ROOTS", "ALIGN_MODEL_ROOTS"}),
        ({"data_roots": [str(serve / "artifacts")], "artifact_root": str(serve / "artifacts")},
         {"ALIGN_ARTIFACT_ROOT", "ALIGN_DATA_ROOTS"}),
        ({"model_roots": [str(serve / "artifacts" / "lineage")], "artifact_root": f"file://{serve / 'artifacts'}"},
         {"ALIGN_ARTIFACT_ROOT", "ALIGN_MODEL_ROOTS"}),
        ({"model_roots": [str(serve)], "work_root": str(serve / "work")}, {"ALIGN_WORK_ROOT", "ALIGN_MODEL_ROOTS"}),
        # Through a symlink: the alias is the serve folder.
        ({"data_roots": [str(tmp_path / "alias")], "artifact_root": str(serve / "a")},
         {"ALIGN_ARTIFACT_ROOT", "ALIGN_DATA_ROOTS"}),
        # A tenant named "artifacts" would read the store.
        ({"data_roots": [str(serve / "{tenant}")], "artifact_root": str(serve / "artifacts")},
         {"ALIGN_ARTIFACT_ROOT", "ALIGN_DATA_ROOTS"}),
        # A folder shared by every tenant that holds (or lies in) the tenants' own folders.
        ({"data_roots": [str(serve / "{tenant_id}" / "data")], "model_roots": [str(serve)]},
         {"ALIGN_DATA_ROOTS", "ALIGN_MODEL_ROOTS"}),
        ({"data_roots": [str(serve / "{tenant}"), str(serve / "alice")]}, {"ALIGN_DATA_ROOTS"}),
    ]


def test_overlapping_roots_are_refused_at_start_up(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outside = {"artifact_root": str(tmp_path / "store"), "work_root": str(tmp_path / "checkpoints"),
               "data_roots": [str(tmp_path / "d")], "model_roots": [str(tmp_path / "m")]}
    for overrides, settings_named in overlapping(tmp_path):
        with pytest.raises(ValidationError) as refused:
            Settings(database_url="sqlite://", **{**outside, **overrides})
        message = str(refused.value)
        assert "refuses to start" in message and all(name in message for name in settings_named), (overrides, message)
    for name, value in (("ALIGN_DATA_ROOTS", json.dumps([str(tmp_path)])), ("ALIGN_ARTIFACT_ROOT", str(tmp_path))):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValidationError, match=name):
            Settings()
        monkeypatch.delenv(name)
    # The defaults of `align serve` run from a clone (and of the demo) keep apart.
    defaults = Settings()
    assert defaults.data_roots == [str(tmp_path / "data" / "{tenant}")]
    assert defaults.model_roots == [str(tmp_path / "models" / "{tenant}")]
    assert defaults.artifact_root == str(tmp_path / ".align" / "artifacts")
    remote = Settings(artifact_root="s3://bucket/align", work_root=str(tmp_path / "w"),
                      data_roots=[str(tmp_path / "d")], model_roots=[str(tmp_path / "d")])
    assert remote.artifact_root == "s3://bucket/align"  # a remote store overlaps no local folder


def test_align_serve_refuses_overlapping_roots_before_it_starts_anything(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGN_") or k == "ALIGN_CACHE_DIR"}
    env.update(PYTHONPATH=str(REPO), COLUMNS="1000", ALIGN_HOME=str(tmp_path / "home"),
               ALIGN_DATA_ROOTS=json.dumps([str(tmp_path)]), ALIGN_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
               ALIGN_WORK_ROOT=str(tmp_path / "work"))
    result = subprocess.run([sys.executable, "-m", "services.cli", "serve"], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    output = result.stderr + result.stdout
    assert output.startswith("the service refuses to start: ") and "Traceback" not in output, output
    assert f"ALIGN_ARTIFACT_ROOT ({tmp_path / 'artifacts'}) and the ALIGN_DATA_ROOTS entry '{tmp_path}' overlap" \
        in output
    assert not (tmp_path / "home").exists()  # no database, no key, no Ray


def test_tenant_roots_name_the_tenant():
    class Tenant:
        def __init__(self, name):
            self.id, self.name = f"tn_{len(name)}", name

    roots = ["/srv/data/{tenant}", "/srv/by-id/{tenant_id}/in", "/srv/shared"]
    assert tenant_roots(roots, Tenant("alice")) == ["/srv/data/alice", "/srv/by-id/tn_5/in", "/srv/shared"]
    # A name that is no safe folder name reads through its id only.
    for unsafe in ("..", ".hidden", "a/b", "a\x00b", "", "x" * 201, "ａlice"):
        assert tenant_roots(roots, Tenant(unsafe)) == [f"/srv/by-id/tn_{len(unsafe)}/in", "/srv/shared"], unsafe
    assert tenant_roots(roots, None) == ["/srv/shared"]


def same_answer(service, tenant: str, place, hostile: str, missing: str) -> dict:
    """POST a job with ``place(spec, location)`` set to ``hostile`` and to ``missing``: the two answers must be
    one and the same once each location is replaced by a placeholder. Returns the answer's fields."""
    answers = []
    for location in (hostile, missing):
        spec = job_spec("builtin:parity/sft")  # nothing else to read: each answer comes in milliseconds
        place(spec, location)
        response = service.client.post("/jobs", json=spec, headers=service.headers[tenant])
        fields(response)
        text = response.text.replace(json.dumps(location)[1:-1], "LOCATION")
        answers.append(text.replace(location.removeprefix("artifact:"), "LOCATION"))
    assert answers[0] == answers[1], (hostile, missing)
    return {item["field"]: item["message"] for item in json.loads(answers[0])["detail"]}


def data_path(spec, location):
    spec["stages"][0]["data"]["path"] = location


def eval_path(spec, location):
    spec["stages"][0]["data"]["eval_path"] = location


def base_model(spec, location):
    spec["base_model"] = location


def reward_model(spec, location):
    spec["stages"] = [{"type": "ppo", "data": {"path": "builtin:parity/prompts"}, "reward_model": location,
                       "max_steps": 1}]


def beside(location: str) -> str:
    """The same location with its last name changed to one that names nothing."""
    head, _, name = location.rstrip("/").rpartition("/")
    return f"{head}/nope-{name}"


def test_tenant_b_cannot_reach_tenant_a_files(tmp_path, database_url, session_factory):
    """Every way bob may name alice's artifacts, checkpoints, data and models, as data, held-out data, base model
    or reward model, by path, file:// URL, `..`, symlink or artifact reference, gets the very answer a location
    naming nothing gets; alice herself may use each of them."""
    with two_tenant_service(tmp_path, database_url, session_factory) as service:
        adapter = tmp_path / "staging" / "adapter"
        model_folder(adapter, {"adapter_model.safetensors": safetensors_bytes(w=b"\x01" * 16),
                               "metrics.jsonl": json.dumps({"step": 1, "loss": 0.5}) + "\n"})
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny"}))
        rm_folder = model_folder(tmp_path / "staging" / "rm", {"model.safetensors": safetensors_bytes(w=b"\x02")})
        artifact_id = record_artifact(service, "alice", adapter, lineage="secret.sft")
        rm_id = record_artifact(service, "alice", rm_folder, lineage="secret.rm", kind="reward_model")
        version = tmp_path / "artifacts" / "secret.sft" / "v1"
        checkpoint = tmp_path / "work" / "job_a" / "sr_a" / "metrics.jsonl"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
        alice_data, alice_model = service.data["alice"] / "sft.jsonl", service.models["alice"] / "llama"
        model_folder(alice_model, {"model.safetensors": safetensors_bytes(w=b"\x03")})
        bob = service.data["bob"]
        (bob / "to-alice.jsonl").symlink_to(alice_data)
        (bob / "to-store.jsonl").symlink_to(version / "metrics.jsonl")
        (bob / "to-store").symlink_to(tmp_path / "artifacts")
        (service.models["bob"] / "to-alice").symlink_to(alice_model)

        # Alice may read each of these: they exist, and her answer would tell their columns.
        own = [(data_path, str(alice_data)), (eval_path, f"file://{alice_data}"), (base_model, str(alice_model)),
               (base_model, f"artifact:{artifact_id}"), (reward_model, f"artifact:{rm_id}")]
        for place, location in own:
            spec = job_spec(str(alice_data))
            place(spec, location)
            response = service.client.post("/jobs", json=spec, headers=service.headers["alice"])
            assert response.status_code == 201, (location, response.text)
        assert "'rejected'" in fields(service.client.post("/jobs", headers=service.headers["alice"], json={
            **job_spec(str(alice_data)), "stages": [{"type": "dpo", "data": {"path": str(alice_data)}}]}))[
            "stages[0].data.path"]

        attempts = [(place, location, beside(location)) for place in (data_path, eval_path) for location in (
            str(version / "metrics.jsonl"), str(version / "manifest.json"), f"file://{version}/adapter_config.json",
            str(version), f"{version}/./metrics.jsonl", f"{tmp_path}/artifacts//secret.sft/v1/manifest.json",
            str(checkpoint), str(alice_data), f"file://{alice_data}", f"{bob}/../alice/sft.jsonl",
            str(bob / "to-alice.jsonl"), str(bob / "to-store.jsonl"), f"{bob}/to-store/secret.sft/v1/metrics.jsonl",
        )]
        attempts += [(base_model, location, beside(location)) for location in (
            str(version), f"file://{version}", str(alice_model), f"{service.models['bob']}/../alice/llama",
            str(service.models["bob"] / "to-alice"), str(checkpoint.parent), str(tmp_path / "artifacts"),
        )]
        attempts += [(base_model, f"artifact:{artifact_id}", "artifact:secret.sft-v1-0123456789ab"),
                     (base_model, f"artifact:{rm_id}", "artifact:secret.rm-v1-0123456789ab"),
                     (reward_model, f"artifact:{rm_id}", "artifact:secret.rm-v1-0123456789ab"),
                     (data_path, f"artifact:{artifact_id}", "artifact:secret.sft-v1-0123456789ab")]
        for place, hostile, missing in attempts:
            refused = same_answer(service, "bob", place, hostile, missing)
            assert len(refused) == 1 and "LOCATION" in next(iter(refused.values())), (hostile, refused)
        assert len(attempts) == 37
        jobs = service.client.get("/jobs", headers=service.headers["bob"]).json()["data"]
        assert jobs == []


HOSTILE = [
    "../sft.jsonl", "{bob}/../alice/sft.jsonl", "{bob}/sub/../../alice/sft.jsonl", "/etc/passwd",
    "file:///etc/passwd", "file://localhost/etc/passwd", "file:{bob}/sft.jsonl",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "https://example.com/sft.jsonl",
    "HTTP://169.254.169.254/", "ftp://example.com/x.jsonl", "gs://bucket/x.jsonl", "hf://datasets/x/y",
    "simplecache::http://169.254.169.254/", "s3://bucket/x.jsonl", "sft.jsonl", "~/sft.jsonl", "//etc/passwd",
    "{bob}/loop.jsonl", "{bob}/fifo.jsonl", "{bob}/", "/proc/self/environ", "/dev/zero",
]


@pytest.mark.parametrize("place", [data_path, eval_path, base_model], ids=lambda place: place.__name__)
def test_hostile_locations_get_a_422_naming_the_field(tmp_path, database_url, session_factory, place):
    field = {"data_path": "stages[0].data.path", "eval_path": "stages[0].data.eval_path",
             "base_model": "base_model"}[place.__name__]
    with two_tenant_service(tmp_path, database_url, session_factory) as service:
        bob = service.data["bob"]
        (bob / "loop.jsonl").symlink_to(bob / "loop.jsonl")
        os.mkfifo(bob / "fifo.jsonl")  # reading it would hang
        for location in HOSTILE:
            spec = job_spec(str(bob / "sft.jsonl"))
            place(spec, location.format(bob=bob))
            response = service.client.post("/jobs", json=spec, headers=service.headers["bob"])
            assert field in fields(response), (location, response.text)


def test_allowed_remote_schemes_still_refuse_hosts_chains_and_the_stores():
    """With s3:// allowed, a location is left to the worker, but not one that names a host by address or a
    metadata service, chains filesystems, or lies in a remote artifact or work store."""
    hidden = ["s3://bucket/align", "/srv/work"]
    for location in ("s3://bucket/data/x.jsonl", "s3://bucket/alignment/x.jsonl"):
        assert location_problem(location, ["/srv/data"], ["file", "s3"], hidden=hidden) is None
    for location in ("s3://169.254.169.254/latest/meta-data", "s3://[fd00:ec2::254]/x", "s3://localhost/x",
                     "s3://metadata.google.internal/x", "s3://bucket/x::http://169.254.169.254/",
                     "s3://bucket/align/secret.sft/v1/metrics.jsonl", "s3://bucket/align"):
        problem = location_problem(location, ["/srv/data"], ["file", "s3"], hidden=hidden)
        assert problem == (f"'{location}': no such file or folder in your data folders [/srv/data]; give the full "
                           "path of one under them (the service's ALIGN_DATA_ROOTS)"), location
