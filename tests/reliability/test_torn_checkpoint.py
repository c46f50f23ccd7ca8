"""A torn checkpoint (no marker, a marker cut short, a file truncated or missing) is skipped: resuming uses
the complete one before it, and the resumed run matches an uninterrupted one, loss for loss and bit for bit."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from align.engine.checkpoint import MARKER, checkpoint_problem, complete_checkpoints
from align.runner import run_job
from align.spec import parse_spec

STEPS, EVERY = 7, 2


class Crash(Exception):
    pass


def sft_job(small_model, small_data):
    stage = {"type": "sft", "data": {"path": str(small_data["sft"])}, "batch_size": 4, "max_steps": STEPS,
             "lr": 1e-3, "checkpoint_every": EVERY, "seed": 7}
    return parse_spec({"name": "test", "base_model": str(small_model), "stages": [stage],
                       "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                       "deepspeed": {"zero_stage": 0, "precision": "fp32"}})


def losses(work: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (work / "sft" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file() and p.name != MARKER), key=lambda p: p.stat().st_size)


def tear_marker(folder: Path) -> None:
    (folder / MARKER).unlink()


def cut_marker(folder: Path) -> None:
    marker = folder / MARKER
    marker.write_text(marker.read_text()[:20])


def truncate_a_file(folder: Path) -> None:
    path = largest_file(folder)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove_rng_state(folder: Path) -> None:
    next(folder.glob("rng_rank*.pt")).unlink()


TEARS = {"no marker": tear_marker, "marker cut short": cut_marker, "file truncated": truncate_a_file,
         "file missing": remove_rng_state}


@pytest.fixture(scope="module")
def runs(small_model, small_data, tmp_path_factory):
    """An uninterrupted run, and a run that crashed after its last step with checkpoints at steps 4 and 6."""
    root = tmp_path_factory.mktemp("torn")
    job = sft_job(small_model, small_data)
    (straight,) = run_job(job, work_root=root / "straight", artifact_root=str(root / "a-straight"))

    def crash_at_last_step(stage, record):
        if record.get("step") == STEPS and "loss" in record:
            raise Crash()

    with pytest.raises(Crash):
        run_job(job, work_root=root / "crashed", artifact_root=str(root / "a-crashed"), on_metrics=crash_at_last_step)
    return job, root, straight


def test_a_complete_checkpoint_passes_and_each_tear_is_named(runs, tmp_path):
    _, root, _ = runs
    checkpoints = root / "crashed" / "sft" / "checkpoints"
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [4, 6]
    newest = checkpoints / "step-00000006"
    assert checkpoint_problem(newest) is None
    expected = {"no marker": f"no {MARKER}", "marker cut short": "not a complete align state",
                "file truncated": "bytes", "file missing": "rng_rank0.pt is missing"}
    for name, tear in TEARS.items():
        copy = tmp_path / name.replace(" ", "-") / "checkpoints"
        shutil.copytree(checkpoints, copy)
        tear(copy / newest.name)
        assert expected[name] in checkpoint_problem(copy / newest.name), name
        assert [step for step, _ in complete_checkpoints(copy)] == [4], name
    older = tmp_path / "older-marker"
    shutil.copytree(newest, older)
    state = json.loads((older / MARKER).read_text())
    del state["files"]
    (older / MARKER).write_text(json.dumps(state))
    assert checkpoint_problem(older) is None, "a marker written before markers listed their files still counts"


RESUMED = ("no marker", "file truncated")
"""The tears a resumed run is trained on (each of the others is skipped the same way, shown above)."""


@pytest.mark.parametrize("tear", RESUMED, ids=[name.replace(" ", "-") for name in RESUMED])
def test_resume_skips_a_torn_checkpoint_and_uses_the_one_before(runs, tmp_path, tear):
    job, root, straight = runs
    work = tmp_path / "work"
    shutil.copytree(root / "crashed", work)
    checkpoints = work / "sft" / "checkpoints"
    TEARS[tear](checkpoints / "step-00000006")
    assert [step for step, _ in complete_checkpoints(checkpoints)] == [4]

    logged: list[int] = []
    (resumed,) = run_job(job, work_root=work, artifact_root=str(tmp_path / "artifacts"),
                         on_metrics=lambda stage, record: logged.append(record["step"]) if "loss" in record else None)
    assert logged[0] == 5, f"resumed at step {logged[0]}, not after the complete checkpoint of step 4"
    assert losses(work) == losses(root / "straight")
    adapter = "adapter_model.safetensors"
    assert sha256(Path(resumed.artifact.uri) / adapter) == sha256(Path(straight.artifact.uri) / adapter)
