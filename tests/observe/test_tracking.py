"""report_to: the spec field, its checks, and TensorBoard event files and an MLflow run read back after training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from align.artifacts import ArtifactStore, sha256_file
from align.runner import run_job
from align.spec import SpecError, parse_spec
from align.tracking import MLFLOW_TRACKING_URI_ENV, StageTracker, TrackingError
from services.app import create_app
from services.settings import Settings
from workers.entrypoint import classify

BASE = {"name": "tracked", "base_model": "builtin:tiny", "stages": [{"type": "sft", "data": {"path": "d.jsonl"}}]}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A local file: tracking store (MLflow asks for an explicit opt-in to its file backend)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv(MLFLOW_TRACKING_URI_ENV, uri)
    return uri


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.mark.parametrize(("value", "expected"), [
    ("tensorboard", ["tensorboard"]), ("all", ["tensorboard", "mlflow"]), ("none", []), ([], []),
    (["mlflow", "tensorboard", "mlflow"], ["mlflow", "tensorboard"]),
])
def test_report_to_takes_hugging_faces_forms(value, expected):
    assert parse_spec({**BASE, "report_to": value}).report_to == expected
    assert parse_spec(BASE).report_to == []


@pytest.mark.parametrize(("value", "message"), [
    ("wandb", "'wandb' is not supported; use tensorboard, mlflow, a list of them, all or none"),
    (["none", "mlflow"], "'none' stands alone; give it as report_to: none"),
])
def test_report_to_refuses_other_names(value, message):
    with pytest.raises(SpecError) as refused:
        parse_spec({**BASE, "report_to": value})
    assert refused.value.errors == [("report_to", message)]


def test_mlflow_without_a_tracking_uri_is_refused_at_post_and_needs_none_for_tensorboard(
        database_url, session_factory, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    spec = {**BASE, "stages": [{"type": "sft", "data": {"path": str(tmp_path / "d.jsonl")}}]}
    headers = {"Authorization": "Bearer k"}
    for uri, report_to, expected in ((None, ["tensorboard", "mlflow"], 422), (None, ["tensorboard"], 201),
                                     ("http://mlflow:5000", ["mlflow"], 201)):
        settings = Settings(database_url=database_url, bootstrap_api_key="k", run_dispatcher=False,
                            data_roots=[str(tmp_path)], mlflow_tracking_uri=uri)
        with TestClient(create_app(settings, session_factory=session_factory)) as client:
            response = client.post("/jobs", json={**spec, "report_to": report_to}, headers=headers)
        assert response.status_code == expected, response.text
    refused = TestClient(create_app(Settings(database_url=database_url, bootstrap_api_key="k", run_dispatcher=False,
                                             data_roots=[str(tmp_path)]), session_factory=session_factory))
    with refused as client:
        detail = client.post("/jobs", json={**spec, "report_to": "mlflow"}, headers=headers).json()["detail"]
    assert detail == [{"field": "report_to", "message": (
        "names mlflow, but no MLflow tracking URI is configured: set ALIGN_MLFLOW_TRACKING_URI (the service's "
        "setting for submitted jobs, the environment for align train) or drop mlflow from report_to")}]


def test_validate_and_the_worker_name_the_missing_tracking_uri(tmp_path, monkeypatch):
    from align.cli import file_problems

    monkeypatch.delenv(MLFLOW_TRACKING_URI_ENV, raising=False)
    job = parse_spec({**BASE, "report_to": "mlflow"})
    assert [field for field, _ in file_problems(job, tmp_path)][:1] == ["report_to"]
    with pytest.raises(TrackingError) as error:
        StageTracker(job=job, stage_index=0, stage_name="sft", work_dir=tmp_path, job_id=None,
                     mlflow_tracking_uri=None, warn=print)
    failure = classify(error.value, None)
    assert (failure["code"], failure["field"], failure["retryable"]) == ("bad_tracking", "report_to", False)


def test_a_resumed_attempt_replaces_the_events_after_its_checkpoint(tmp_path):
    """Steps 1-4 logged, the attempt dies; the next resumes after step 2 and logs 3-4 again with new values."""
    job = parse_spec({**BASE, "report_to": "tensorboard"})

    def attempt(resumed_after, losses):
        tracker = StageTracker(job=job, stage_index=0, stage_name="sft", work_dir=tmp_path / "work", job_id=None,
                               mlflow_tracking_uri=None, warn=print)
        if resumed_after is not None:
            tracker.resumed_after(resumed_after)
        for step, loss in losses.items():
            tracker.log({"step": step, "loss": loss, "time": 1000.0 + step})
        return tracker

    attempt(None, {1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}).end(failed=True)
    (tmp_path / "out").mkdir()
    assert attempt(2, {3: 2.5, 4: 1.5}).close_files(tmp_path / "out") == {"tensorboard": "tb"}
    assert scalars(tmp_path / "out" / "tb", "train/loss") == [(1, 4.0), (2, 3.0), (3, 2.5), (4, 1.5)]
    attempt(None, {1: 9.0}).close_files(tmp_path / "out2")  # a fresh start drops every earlier event
    assert scalars(tmp_path / "out2" / "tb", "train/loss") == [(1, 9.0)]


def test_training_reports_to_tensorboard_and_mlflow(small_model, small_data, job_factory, tmp_path, mlflow_store):
    stage = {"type": "sft", "data": {"path": str(small_data["sft"]), "eval_fraction": 0.25}, "batch_size": 4,
             "max_steps": 2, "eval_every": 1, "lr": 1e-3}
    job = job_factory(small_model, [stage], name="tracked", report_to=["tensorboard", "mlflow"])
    (result,) = run_job(job, work_root=tmp_path / "work", artifact_root=str(tmp_path / "artifacts"))

    folder = Path(result.artifact.uri)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    eval_losses = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    assert [step for step, _ in losses] == [1, 2] and [step for step, _ in eval_losses] == [1, 2]

    manifest = json.loads((folder / "manifest.json").read_text())
    event_files = sorted(name for name in manifest["files"] if name.startswith("tb/"))
    assert len(event_files) == 1 and event_files[0].startswith("tb/events.out.tfevents.")
    assert manifest["files"][event_files[0]]["sha256"] == sha256_file(folder / event_files[0])
    ArtifactStore(str(tmp_path / "artifacts")).verify(result.artifact.uri)
    for tag, logged in (("train/loss", losses), ("eval/loss", eval_losses)):
        read = scalars(folder / "tb", tag)
        assert [step for step, _ in read] == [step for step, _ in logged]
        assert [value for _, value in read] == pytest.approx([value for _, value in logged], rel=1e-6)  # float32

    tracking = manifest["tracking"]
    assert tracking["tensorboard"] == "tb" and tracking["mlflow"]["tracking_uri"] == mlflow_store
    client = MlflowClient(tracking_uri=mlflow_store)
    run = client.get_run(tracking["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "sft"
    assert client.get_experiment(run.info.experiment_id).name == "tracked" == job.name
    assert run.data.tags["align.artifact_id"] == result.artifact.artifact_id
    assert run.data.params["stage.lr"] == "0.001" and run.data.params["adapter.r"] == "4"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == losses
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss")) == eval_losses


def test_a_tracking_server_that_fails_at_the_start_warns_and_training_goes_on(tmp_path, monkeypatch):
    """As when it fails mid-stage: one warning, no MLflow entry in the manifest, TensorBoard still written."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "not-a-folder").write_text("")
    job = parse_spec({**BASE, "report_to": "all"})
    warnings: list[str] = []
    tracker = StageTracker(job=job, stage_index=0, stage_name="sft", work_dir=tmp_path / "work", job_id=None,
                           mlflow_tracking_uri=(tmp_path / "not-a-folder" / "mlruns").as_uri(), warn=warnings.append)
    tracker.log({"step": 1, "loss": 2.0, "time": 1000.0})
    tracker.log({"step": 2, "loss": 1.0, "time": 1001.0})
    assert tracker.close_files(tmp_path / "out") == {"tensorboard": "tb"}
    tracker.end("artifact-id")
    assert len(warnings) == 1 and warnings[0].startswith("mlflow: could not start the run")
    assert scalars(tmp_path / "out" / "tb", "train/loss") == [(1, 2.0), (2, 1.0)]
