"""The job the kill trials run and what they read back about it: a one-stage DPO of a few steps on the small
model, fp32 with a fixed seed, so that every uninterrupted or correctly resumed run gives the same adapter."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import select

STEPS, CHECKPOINT_EVERY = 6, 2
TERMINAL = ("succeeded", "failed", "cancelled")


def dpo_spec(model: Path, data: dict, name: str, steps: int = STEPS) -> dict:
    stage = {"type": "dpo", "data": {"path": str(data["prefs"])}, "batch_size": 4, "max_steps": steps, "lr": 1e-3,
             "beta": 0.1, "seed": 7, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1}
    return {"name": name, "base_model": str(model), "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "deepspeed": {"zero_stage": 0, "precision": "fp32"},
            "resources": {"num_workers": 1, "cpus_per_worker": 1}, "stages": [stage]}


def wait_until(service, job_id: str, condition, seconds: float = 600, what: str = "the condition") -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = service.client.job(job_id)
        if condition(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {what} in {seconds:.0f} s: {service.client.job(job_id)}")


def wait_finished(service, job_id: str, seconds: float = 900) -> dict:
    return wait_until(service, job_id, lambda job: job["status"] in TERMINAL, seconds, "an end")


def ray_submissions(service, stage_run_id: str) -> dict[str, str]:
    """Submission id -> status of every Ray job of the stage run."""
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(service.env["ALIGN_RAY_ADDRESS"]).list_jobs()
    prefix = f"align-{stage_run_id}-a"
    return {job.submission_id: str(job.status.value) for job in jobs if (job.submission_id or "").startswith(prefix)}


def job_facts(service, job: dict) -> dict:
    """What the trials compare: attempts, Ray jobs, artifact rows and store versions, the loss logged at each
    step of each attempt (and how often), and the adapter's sha256."""
    from services.db.models import Artifact, Event

    (stage,) = job["stages"]
    sessions = service.sessions()
    with sessions() as s:
        artifacts = list(s.scalars(select(Artifact).where(Artifact.stage_run_id == stage["id"])))
        metrics = [(e.attempt, e.payload) for e in s.scalars(
            select(Event).where(Event.stage_run_id == stage["id"], Event.type == "metrics").order_by(Event.id))]
    sessions.kw["bind"].dispose()
    losses = [(attempt, record["step"], record["loss"]) for attempt, record in metrics if "loss" in record]
    facts = {
        "status": job["status"], "attempt": stage["attempt"], "artifact_id": stage["artifact_id"],
        "ray": ray_submissions(service, stage["id"]),
        "artifact_rows": [(a.id, a.attempt) for a in artifacts],
        "loss_reports": Counter((attempt, step) for attempt, step, _ in losses),
        "losses": {(attempt, step): loss for attempt, step, loss in losses},
        "versions": [],
        "adapter_sha256": None,
    }
    if artifacts:
        folder = Path(artifacts[0].uri)
        facts["versions"] = sorted(p.name for p in folder.parent.iterdir() if (p / "manifest.json").is_file())
        facts["adapter_sha256"] = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
    return facts
