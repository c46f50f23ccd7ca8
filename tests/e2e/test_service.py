"""The whole service: HTTP -> Postgres -> dispatcher -> Ray Jobs -> Ray Train + DeepSpeed -> artifacts.

One `align serve` process on the real Postgres, a 2-node local Ray cluster, a small Llama model.
"""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest
from processes import job_processes

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
    return next((process for process, cmdline, _ in job_processes(stage_run_id) if "workers.entrypoint" in cmdline),
                None)


def test_killed_stage_is_retried_and_resumes_from_its_checkpoint_then_grpo_continues_it(
    service, small_model, small_data
):
    """The SFT stage's entrypoint is killed after a checkpoint: the attempt is retried and resumes after a
    checkpoint, and the next stage, GRPO, starts from the artifact of that second attempt."""
    client, _, log = service
    prompts = small_data["sft"].parent / "parity-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Is {n} even or odd?"}) + "\n" for n in range(20)))
    grpo = {"type": "grpo", "data": {"path": str(prompts)}, "reward": "exact_answer", "group_size": 4,
            "batch_size": 2, "max_new_tokens": 4, "max_steps": 2, "lr": 1e-3, "max_length": 64}
    spec = job_spec(small_model, [sft(small_data, max_steps=20, checkpoint_every=5), grpo], name="e2e-retry-grpo")
    job = client.submit(spec)
    job = wait_until(client, job["id"], lambda j: (j["stages"][0]["checkpoint_step"] or 0) >= 5)
    stage_run = job["stages"][0]["id"]
    process = _entrypoint_of(stage_run)
    assert process is not None
    os.kill(process.pid, signal.SIGKILL)

    job = wait_until(client, job["id"], finished, 420)
    assert job["status"] == "succeeded", log.read_text()[-3000:]
    assert [stage["attempt"] for stage in job["stages"]] == [2, 1]
    metrics = client.metrics(job["id"])
    records = next(m["records"] for m in metrics if m["stage_run_id"] == stage_run)
    first = [r["step"] for r in records if r.get("attempt") == 1 and "loss" in r]
    second = [r["step"] for r in records if r.get("attempt") == 2 and "loss" in r]
    resumed_from = second[0] - 1
    assert resumed_from % 5 == 0 and 5 <= resumed_from <= first[-1], \
        f"attempt 2 resumed at {second[0]}, not after a checkpoint"
    assert second == list(range(second[0], 21))

    sft_id, grpo_id = (stage["artifact_id"] for stage in job["stages"])
    assert client.artifact(grpo_id)["parents"] == [sft_id]
    grpo_records = next(m["records"] for m in metrics if m["name"] == "grpo")
    steps = [r for r in grpo_records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6), "GRPO starts at its reference, the SFT policy"


def placements(client, job_id: str) -> dict[str, list[dict]]:
    """Where each stage run's ranks ran, from its "ranks placed: " message (the last attempt's)."""
    found = {}
    for event in client.events(job_id, type="message", limit=1000)["data"]:
        if event["payload"]["text"].startswith("ranks placed: "):
            found[event["stage_run_id"]] = json.loads(event["payload"]["text"].removeprefix("ranks placed: "))
    return found


def test_sft_rm_ppo_on_the_builtin_model_with_two_workers_on_two_nodes(service):
    """InstructGPT's chain through the service: SFT and PPO on 2 Ray workers (ZeRO-2), one per node of the
    cluster, the reward model on 1 (its own `resources`); PPO continues the SFT policy and scores with the
    job's reward model."""
    client, _, log = service
    common = {"batch_size": 4, "max_length": 64, "checkpoint_every": 100}
    stages = [
        {"type": "sft", "data": {"path": "builtin:parity/sft"}, "max_steps": 4, "lr": 1e-3, **common},
        {"type": "rm", "data": {"path": "builtin:parity/prefs"}, "init": "policy", "max_steps": 4, "lr": 1e-3,
         "resources": {"num_workers": 1, "cpus_per_worker": 1}, **common},
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
    sft_artifact, rm_artifact, ppo_artifact = client.artifact(sft_id), client.artifact(rm_id), client.artifact(ppo_id)
    assert "adapter_model.safetensors" in sft_artifact["manifest"]["files"]
    assert sft_artifact["metrics"]["steps"] == 4
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

    placed = placements(client, job["id"])
    for stage in job["stages"]:
        ranks = placed[stage["id"]]
        if stage["name"] == "rm":
            assert [p["rank"] for p in ranks] == [0], "the rm stage's own resources: one worker"
            continue
        assert sorted(p["rank"] for p in ranks) == [0, 1], stage["name"]
        assert len({p["node_id"] for p in ranks}) == 2, f"{stage['name']}: one rank per node"
    samples = client.events(job["id"], type="samples", limit=1000)["data"]
    assert samples
    assert all({"prompt", "completion", "score"} <= set(s) for e in samples for s in e["payload"]["samples"])
