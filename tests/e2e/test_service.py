"""The whole service: HTTP -> Postgres -> dispatcher -> Ray Jobs -> Ray Train + DeepSpeed -> artifacts.

One `align serve` process on the real Postgres, a 2-node local Ray cluster, a small Llama model.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

TERMINAL = ("succeeded", "failed", "cancelled")


def sft(data, **extra) -> dict:
    stage = {"type": "sft", "data": {"path": str(data["sft"]), "eval_fraction": 0.25}, "batch_size": 4,
             "max_steps": 4, "lr": 1e-3, "seed": 7, "checkpoint_every": 2}
    stage.update(extra)
    return stage


def dpo(data, **extra) -> dict:
    stage = {"type": "dpo", "data": {"path": str(data["prefs"]), "eval_fraction": 0.25}, "batch_size": 4,
             "max_steps": 3, "lr": 1e-3, "beta": 0.1, "seed": 7}
    stage.update(extra)
    return stage


def job_spec(model, stages, name="e2e", **overrides) -> dict:
    spec = {"name": name, "base_model": str(model), "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"zero_stage": 0, "precision": "auto"}, "resources": {"num_workers": 1, "cpus_per_worker": 1},
            "stages": stages}
    spec.update(overrides)
    return spec


def wait_until(client, job_id: str, condition, seconds: float = 240) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if condition(job):
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not reach the condition in {seconds:.0f} s: {client.job(job_id)}")


def finished(job: dict) -> bool:
    return job["status"] in TERMINAL


def test_sft_then_dpo_end_to_end(service, small_model, small_data, tmp_path):
    client, _, log = service
    job = client.submit(job_spec(small_model, [sft(small_data), dpo(small_data)]))
    assert job["status"] == "queued" and [s["state"] for s in job["stages"]] == ["queued", "pending"]

    events = list(client.stream_events(job["id"]))  # ends when the job does
    job = client.job(job["id"])
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    assert [(s["state"], s["attempt"]) for s in job["stages"]] == [("succeeded", 1), ("succeeded", 1)]

    transitions = [(e["payload"]["from"], e["payload"]["to"]) for e in events if e["type"] == "state"]
    for stage_transitions in ([("queued", "running"), ("running", "succeeded")], [("pending", "queued")]):
        for transition in stage_transitions:
            assert transition in transitions
    assert any(e["type"] == "metrics" and "loss" in e["payload"] for e in events)

    metrics = {m["name"]: m["records"] for m in client.metrics(job["id"])}
    assert [r["step"] for r in metrics["sft"] if "loss" in r] == [1, 2, 3, 4]
    dpo_first = next(r for r in metrics["dpo"] if r.get("step") == 1 and "loss" in r)
    assert dpo_first["loss"] == pytest.approx(0.6931, abs=1e-3), "DPO starts from the SFT policy as its reference"

    sft_artifact = client.artifact(job["stages"][0]["artifact_id"])
    dpo_artifact = client.artifact(job["stages"][1]["artifact_id"])
    assert sft_artifact["parents"] == [] and dpo_artifact["parents"] == [sft_artifact["id"]]
    assert (sft_artifact["lineage"], dpo_artifact["lineage"]) == ("e2e.sft", "e2e.dpo")
    manifest = dpo_artifact["manifest"]
    assert {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"} <= set(manifest["files"])
    folder = client.download_artifact(dpo_artifact["id"], tmp_path / "dpo")  # checks every sha256
    assert hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest() == dpo_artifact[
        "manifest_hash"].removeprefix("sha256:")


def test_cancel_mid_stage_stops_the_ray_job_and_later_stages_never_start(service, small_model, small_data):
    client, env, _ = service
    spec = job_spec(small_model, [sft(small_data, max_steps=5000, checkpoint_every=1000, log_every=1),
                                  dpo(small_data)], name="e2e-cancel")
    job = client.submit(spec)
    wait_until(client, job["id"], lambda j: (j["stages"][0]["progress"]["step"] or 0) >= 2)
    client.cancel(job["id"])
    job = wait_until(client, job["id"], finished, 30)
    assert job["status"] == "cancelled"
    assert [s["state"] for s in job["stages"]] == ["cancelled", "cancelled"]
    assert job["stages"][1]["attempt"] == 0, "the stage after a cancelled one never starts"

    from ray.job_submission import JobSubmissionClient

    ray_jobs = JobSubmissionClient(env["ALIGN_RAY_ADDRESS"])
    submission = f"align-{job['stages'][0]['id']}-a1"
    deadline = time.monotonic() + 60
    while str(ray_jobs.get_job_status(submission)) not in ("STOPPED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(ray_jobs.get_job_status(submission)) in ("STOPPED", "FAILED")


def _entrypoint_of(stage_run_id: str) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            ticket = (process.info["environ"] or {}).get("ALIGN_TICKET", "")
        except (psutil.Error, TypeError):
            continue
        if "workers.entrypoint" in cmdline and stage_run_id in ticket:
            return process
    return None


def test_killed_stage_is_retried_and_resumes_from_its_checkpoint(service, small_model, small_data):
    client, _, log = service
    spec = job_spec(small_model, [sft(small_data, max_steps=40, checkpoint_every=5)], name="e2e-retry")
    job = client.submit(spec)
    job = wait_until(client, job["id"], lambda j: (j["stages"][0]["checkpoint_step"] or 0) >= 5)
    stage_run = job["stages"][0]["id"]
    process = _entrypoint_of(stage_run)
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)

    job = wait_until(client, job["id"], finished, 300)
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    assert job["stages"][0]["attempt"] == 2
    records = next(m["records"] for m in client.metrics(job["id"]) if m["stage_run_id"] == stage_run)
    first = [r["step"] for r in records if r.get("attempt") == 1 and "loss" in r]
    second = [r["step"] for r in records if r.get("attempt") == 2 and "loss" in r]
    resumed_from = second[0] - 1
    assert resumed_from % 5 == 0 and 5 <= resumed_from <= first[-1], \
        f"attempt 2 resumed at {second[0]}, not after a checkpoint"
    assert second == list(range(second[0], 41))


def test_two_workers_on_two_nodes_with_zero2(service, small_model, small_data):
    client, _, log = service
    spec = job_spec(small_model, [sft(small_data, batch_size=2, max_steps=4)], name="e2e-multinode",
                    deepspeed={"zero_stage": 2, "precision": "auto"},
                    resources={"num_workers": 2, "cpus_per_worker": 1})
    job = client.submit(spec)
    job = wait_until(client, job["id"], finished, 300)
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    artifact = client.artifact(job["stages"][0]["artifact_id"])
    assert "adapter_model.safetensors" in artifact["manifest"]["files"]
    assert artifact["metrics"]["steps"] == 4
    messages = [e["payload"]["text"] for e in client.events(job["id"], type="message", limit=1000)["data"]]
    placement = json.loads(next(m for m in messages if m.startswith("ranks placed: ")).removeprefix("ranks placed: "))
    assert sorted(p["rank"] for p in placement) == [0, 1]
    assert len({p["node_id"] for p in placement}) == 2, "one rank per node"


def test_sft_then_grpo_through_the_service(service, small_model, small_data):
    client, _, log = service
    prompts = small_data["sft"].parent / "parity-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Is {n} even or odd?"}) + "\n" for n in range(20)))
    grpo = {"type": "grpo", "data": {"path": str(prompts)}, "reward": "exact_answer", "group_size": 4,
            "batch_size": 2, "max_new_tokens": 4, "max_steps": 2, "lr": 1e-3, "max_length": 64}
    job = client.submit(job_spec(small_model, [sft(small_data), grpo], name="e2e-grpo"))
    job = wait_until(client, job["id"], finished, 300)
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    sft_id, grpo_id = (stage["artifact_id"] for stage in job["stages"])
    assert client.artifact(grpo_id)["parents"] == [sft_id]
    records = next(m["records"] for m in client.metrics(job["id"]) if m["name"] == "grpo")
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6), "GRPO starts at its reference, the SFT policy"


def test_sft_rm_ppo_on_the_builtin_model_with_two_workers(service):
    """InstructGPT's chain through the service: every stage on 2 Ray workers (ZeRO-2); PPO continues
    the SFT policy and scores with the job's reward model."""
    client, _, log = service
    common = {"batch_size": 4, "max_length": 64, "checkpoint_every": 100}
    stages = [
        {"type": "sft", "data": {"path": "builtin:parity/sft"}, "max_steps": 4, "lr": 1e-3, **common},
        {"type": "rm", "data": {"path": "builtin:parity/prefs"}, "init": "policy", "max_steps": 4, "lr": 1e-3,
         **common},
        {"type": "ppo", "data": {"path": "builtin:parity/prompts", "eval_path": "builtin:parity/eval_tell",
                                 "max_rows": 64}, "max_new_tokens": 4, "max_steps": 2, "ppo_epochs": 2,
         "lr": 5e-4, "critic_lr": 5e-4, "kl_target": 1.0, **common},
    ]
    spec = job_spec("builtin:tiny", stages, name="e2e-ppo", deepspeed={"zero_stage": 2, "precision": "auto"},
                    resources={"num_workers": 2, "cpus_per_worker": 1},
                    adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
    job = client.submit(spec)
    job = wait_until(client, job["id"], finished, 420)
    assert job["status"] == "succeeded", log.read_text()[-3000:]

    sft_id, rm_id, ppo_id = (stage["artifact_id"] for stage in job["stages"])
    rm_artifact, ppo_artifact = client.artifact(rm_id), client.artifact(ppo_id)
    assert rm_artifact["kind"] == "reward_model" and rm_artifact["parents"] == [sft_id]
    assert "body/adapter_model.safetensors" in rm_artifact["manifest"]["files"]
    assert ppo_artifact["kind"] == "adapter" and ppo_artifact["parents"] == [sft_id, rm_id]
    assert {"adapter_model.safetensors", "samples.jsonl"} <= set(ppo_artifact["manifest"]["files"])

    records = next(m["records"] for m in client.metrics(job["id"]) if m["name"] == "ppo")
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6), "PPO starts at its reference, the SFT policy"
    assert steps[0]["first_pass_ratio"] == pytest.approx(1.0, abs=1e-6)
    evals = [r for r in records if "eval_reward_mean" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["eval_kl"] == pytest.approx(0.0, abs=1e-6)

    ppo_run = next(s for s in job["stages"] if s["name"] == "ppo")
    placement = [json.loads(e["payload"]["text"].removeprefix("ranks placed: "))
                 for e in client.events(job["id"], type="message", limit=1000)["data"]
                 if e["payload"]["text"].startswith("ranks placed: ") and e.get("stage_run_id") == ppo_run["id"]]
    assert placement and sorted(p["rank"] for p in placement[-1]) == [0, 1]
    samples = client.events(job["id"], type="samples", limit=1000)["data"]
    assert samples
    assert all({"prompt", "completion", "score"} <= set(s) for e in samples for s in e["payload"]["samples"])
