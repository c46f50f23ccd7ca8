"""The stage-attempt entrypoint on a real local Ray cluster, with real DeepSpeed and peft, on CPU.

Each test runs ``python -m workers.entrypoint`` as a subprocess driver, reads what it reported to a
stand-in report endpoint, and checks what it left in the artifact store.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from rank_report import tensors_digest
from worker_helpers import (
    CHECKPOINT_EVERY,
    STEPS,
    Receiver,
    adapter_digest,
    make_ticket,
    output_of,
    report_to,
    run_entrypoint,
    sft_spec,
)

from align.artifacts import ArtifactStore
from align.precision import resolve

pytestmark = pytest.mark.slow


def published_versions(artifact_root: Path) -> list[Path]:
    return sorted(artifact_root.glob("*/v*/manifest.json"))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, small_model, small_data, tmp_path_factory):
    """One attempt that runs the stage to the end: (ticket, receiver, finished process)."""
    receiver = Receiver()
    ticket = make_ticket(receiver, sft_spec(small_model, small_data["sft"]), tmp_path_factory.mktemp("whole"))
    done = run_entrypoint(ticket, ray_cluster)
    yield ticket, receiver, done
    receiver.close()


@pytest.fixture(scope="module")
def interrupted(ray_cluster, small_model, small_data, tmp_path_factory):
    """Attempt 1 of the same stage, fenced off by the service when it reports step 3."""
    receiver = Receiver()
    receiver.fence_when = lambda report: report["type"] == "metrics" and report["payload"].get("step") == 3
    ticket = make_ticket(receiver, sft_spec(small_model, small_data["sft"]), tmp_path_factory.mktemp("cut"))
    done = run_entrypoint(ticket, ray_cluster)
    yield ticket, receiver, done
    receiver.close()


def test_attempt_reports_progress_and_publishes_a_verified_adapter(uninterrupted, small_model):
    ticket, receiver, done = uninterrupted
    assert done.returncode == 0, output_of(done)
    assert receiver.reports and all(r["status"] == 200 for r in receiver.reports)
    assert {(r["stage_run_id"], r["attempt"]) for r in receiver.reports} == {("sr_0123abcd", 1)}

    heartbeats = receiver.of_type("heartbeat")
    progress = [h["payload"] for h in heartbeats if "step" in h["payload"]]
    assert progress[0] == {"step": 0, "total_steps": STEPS}
    assert progress[-1] == {"step": STEPS, "total_steps": STEPS}
    # Heartbeats from threads of their own, for the whole attempt, say what it does.
    assert heartbeats[0]["payload"] == {"phase": "starting"}
    phases = [h["payload"]["phase"] for h in heartbeats if "phase" in h["payload"]]
    assert phases[0] == "starting" and "training" in phases and phases[-1] == "publishing"
    losses = [r["payload"] for r in receiver.of_type("metrics") if "loss" in r["payload"]]
    assert [m["step"] for m in losses] == list(range(1, STEPS + 1))
    assert all(math.isfinite(m["loss"]) for m in losses)
    # The stage's own first message says what it trains in and why (the service keeps it as a job event).
    stage_messages = [m["payload"] for m in receiver.of_type("message") if not m["payload"]["text"].startswith("ranks")]
    assert stage_messages[0] == {"level": "info", "text": resolve("fp32").summary()}
    (checkpoint,) = receiver.of_type("checkpoint")
    assert checkpoint["payload"]["step"] == CHECKPOINT_EVERY
    assert Path(checkpoint["payload"]["uri"]).parent == Path(ticket["work_dir"]) / "checkpoints"
    assert not receiver.of_type("failed")

    (artifact,) = receiver.of_type("artifact")
    payload = artifact["payload"]
    store = ArtifactStore(ticket["artifact_root"])
    store.verify(payload["uri"])
    manifest_bytes = (Path(payload["uri"]) / "manifest.json").read_bytes()
    assert payload["manifest_hash"] == "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    manifest = json.loads(manifest_bytes)
    assert (payload["artifact_id"], payload["version"], payload["kind"]) == (manifest["artifact_id"], 1, "adapter")
    assert payload["lineage"] == "workers.sft" and payload["parents"] == []
    assert manifest["job"]["id"] == ticket["job_id"]
    assert manifest["precision"]["requested"] == manifest["precision"]["precision"] == "fp32"
    assert payload["metrics"]["loss"] == losses[-1]["loss"] and payload["metrics"]["steps"] == STEPS

    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(small_model, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, payload["uri"])
    assert tensors_digest(get_peft_model_state_dict(loaded)) == adapter_digest(payload["uri"])


def test_fenced_attempt_stops_early_without_publishing(interrupted):
    ticket, receiver, done = interrupted
    assert done.returncode == 3, output_of(done)
    assert [r["payload"]["step"] for r in receiver.of_type("metrics")] == [1, 2]
    assert [r["payload"]["step"] for r in receiver.of_type("checkpoint")] == [CHECKPOINT_EVERY]
    # The first 409 answered step 3's metrics. After it came no failure report, no artifact and no further
    # step: at most a heartbeat its own thread had in flight, also answered 409.
    first = next(i for i, r in enumerate(receiver.reports) if r["status"] == 409)
    assert (receiver.reports[first]["type"], receiver.reports[first]["payload"]["step"]) == ("metrics", 3)
    assert all((r["type"], r["status"]) == ("heartbeat", 409) for r in receiver.reports[first + 1 :])
    assert not published_versions(Path(ticket["artifact_root"]))


def test_retried_attempt_resumes_from_its_checkpoint(interrupted, uninterrupted, ray_cluster):
    first_ticket, _, first = interrupted
    assert first.returncode == 3, output_of(first)
    receiver = Receiver()
    try:
        ticket = dict(first_ticket, attempt=2, require_checkpoint=True, report=report_to(receiver))
        done = run_entrypoint(ticket, ray_cluster)
        assert done.returncode == 0, output_of(done)
        assert {r["attempt"] for r in receiver.reports} == {2}
        steps = [r["payload"]["step"] for r in receiver.of_type("metrics")]
        assert steps[0] == CHECKPOINT_EVERY + 1 and steps[-1] == STEPS
        (artifact,) = receiver.of_type("artifact")
    finally:
        receiver.close()
    (reference,) = uninterrupted[1].of_type("artifact")
    assert adapter_digest(artifact["payload"]["uri"]) == adapter_digest(reference["payload"]["uri"])


def test_required_checkpoint_that_is_missing_fails_for_good(ray_cluster, receiver, small_model, small_data, tmp_path):
    spec = sft_spec(small_model, small_data["sft"])
    ticket = make_ticket(receiver, spec, tmp_path, attempt=2, require_checkpoint=True)
    done = run_entrypoint(ticket, ray_cluster)
    assert done.returncode == 1, output_of(done)
    (failed,) = receiver.of_type("failed")
    assert failed["attempt"] == 2
    assert failed["payload"]["code"] == "missing_checkpoint" and failed["payload"]["retryable"] is False
    assert "found none" in failed["payload"]["message"]
    assert not receiver.of_type("metrics") and not published_versions(tmp_path / "artifacts")


def test_bad_data_fails_for_good_naming_file_row_and_column(ray_cluster, receiver, small_model, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [good, bad, good]))
    done = run_entrypoint(make_ticket(receiver, sft_spec(small_model, data), tmp_path), ray_cluster)
    assert done.returncode == 1, output_of(done)
    (failed,) = receiver.of_type("failed")
    payload = failed["payload"]
    assert payload["code"] == "bad_data" and payload["retryable"] is False
    assert payload["field"] == "stages[0].data.path"
    assert str(data) in payload["message"] and "row 1" in payload["message"] and "'messages'" in payload["message"]
    assert not published_versions(tmp_path / "artifacts")


def test_stale_attempt_stops_before_starting(ray_cluster, receiver, small_model, small_data, tmp_path):
    receiver.fence_when = lambda report: True
    done = run_entrypoint(make_ticket(receiver, sft_spec(small_model, small_data["sft"]), tmp_path), ray_cluster)
    assert done.returncode == 3, output_of(done)
    assert [(r["type"], r["status"]) for r in receiver.reports] == [("heartbeat", 409)]


def test_next_stage_starts_from_the_published_policy(uninterrupted, ray_cluster, receiver, small_data, tmp_path):
    sft_ticket, sft_receiver, sft_done = uninterrupted
    assert sft_done.returncode == 0, output_of(sft_done)
    (sft_artifact,) = sft_receiver.of_type("artifact")
    spec = json.loads(json.dumps(sft_ticket["spec"]))
    spec["stages"].append(
        {"type": "dpo", "data": {"path": str(small_data["prefs"])}, "batch_size": 2, "max_steps": 2, "lr": 1e-3}
    )
    ticket = make_ticket(
        receiver, spec, tmp_path, index=1, artifact_root=sft_ticket["artifact_root"],
        start_policy=sft_artifact["payload"]["uri"], parents=[sft_artifact["payload"]["artifact_id"]],
    )
    done = run_entrypoint(ticket, ray_cluster)
    assert done.returncode == 0, output_of(done)
    # The reference is the starting policy itself, so the first DPO loss is ln 2.
    first = next(r["payload"] for r in receiver.of_type("metrics") if "loss" in r["payload"])
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    (artifact,) = receiver.of_type("artifact")
    assert artifact["payload"]["parents"] == [sft_artifact["payload"]["artifact_id"]]
    assert artifact["payload"]["lineage"] == "workers.dpo"
