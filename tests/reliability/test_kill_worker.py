"""Kill -9 the Ray Train worker of a running stage after a checkpoint: the attempt fails, the dispatcher
retries the stage, and the next attempt resumes from the last checkpoint, its first logged loss equal to the
uninterrupted run's at that step (and every later one, down to the adapter's bytes).

Runs on the shared local Ray and API server of conftest.py, with the DPO job of the kill trials. The worker
runs in short slices (SIGSTOP while the test reads the job, SIGCONT for ``SLICE`` seconds), so the kill lands
within one slice of the recorded checkpoint, before the attempt can end, however fast the machine trains.
"""

from __future__ import annotations

import signal
import time

import psutil
import pytest
from processes import job_processes
from trial_jobs import CHECKPOINT_EVERY, STEPS, dpo_spec, job_facts, wait_finished

pytestmark = pytest.mark.slow

SLICE = 0.05


def train_worker_of(stage_run_id: str, attempt: int) -> psutil.Process | None:
    """The RayTrainWorker process that runs this attempt's rank 0."""
    return next((process for process, cmdline, ticket in job_processes(stage_run_id)
                 if cmdline.startswith("ray::RayTrainWorker") and f'"attempt":{attempt}' in ticket), None)


def wait_for_train_worker(service, job_id: str, stage_run_id: str, seconds: float = 600) -> psutil.Process:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        worker = train_worker_of(stage_run_id, 1)
        if worker is not None:
            return worker
        time.sleep(0.1)
    raise AssertionError(f"no RayTrainWorker process holds the ticket of attempt 1: {service.client.job(job_id)}")


def kill_after_a_checkpoint(service, job_id: str, worker: psutil.Process, seconds: float = 600) -> dict:
    """SIGKILL ``worker`` once the service has recorded a checkpoint of its attempt; the job as read then."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            worker.send_signal(signal.SIGSTOP)
            job = service.client.job(job_id)
            if (job["stages"][0]["checkpoint_step"] or 0) >= CHECKPOINT_EVERY:
                worker.send_signal(signal.SIGKILL)
                return job
            worker.send_signal(signal.SIGCONT)
            time.sleep(SLICE)
    except psutil.NoSuchProcess as ended:
        raise AssertionError(f"the worker ended before a checkpoint was recorded: {service.client.job(job_id)}") \
            from ended
    worker.send_signal(signal.SIGCONT)
    raise AssertionError(f"no checkpoint recorded in {seconds:.0f} s: {service.client.job(job_id)}")


def test_a_killed_train_worker_resumes_from_the_last_checkpoint_with_the_same_losses(
    fault_service, dpo_baseline, small_model, small_data, capsys
):
    fault_service.keep_dispatching()
    started = time.monotonic()
    job = fault_service.client.submit(dpo_spec(small_model, small_data, "kill-worker"))
    stage_run = job["stages"][0]["id"]
    worker = wait_for_train_worker(fault_service, job["id"], stage_run)
    at_kill = kill_after_a_checkpoint(fault_service, job["id"], worker)
    killed_at = at_kill["stages"][0]["progress"]["step"]

    job = wait_finished(fault_service, job["id"])
    facts = job_facts(fault_service, job)
    assert facts["status"] == "succeeded", job
    assert facts["attempt"] == 2, f"the worker was killed at step {killed_at}, after the stage had ended"
    assert facts["ray"] == {f"align-{stage_run}-a1": "FAILED", f"align-{stage_run}-a2": "SUCCEEDED"}
    first_attempt = sorted(step for attempt, step in facts["losses"] if attempt == 1)
    second_attempt = sorted(step for attempt, step in facts["losses"] if attempt == 2)
    resumed_from = second_attempt[0] - 1
    assert resumed_from % CHECKPOINT_EVERY == 0 and CHECKPOINT_EVERY <= resumed_from <= first_attempt[-1], \
        f"attempt 2 started at step {second_attempt[0]}, not after a checkpoint of attempt 1 (steps {first_attempt})"
    assert second_attempt == list(range(resumed_from + 1, STEPS + 1))
    baseline = {step: loss for (_, step), loss in dpo_baseline["losses"].items()}
    assert facts["losses"][(2, second_attempt[0])] == baseline[second_attempt[0]], "first loss after resuming"
    assert {step: facts["losses"][(2, step)] for step in second_attempt} == \
        {step: baseline[step] for step in second_attempt}
    assert facts["artifact_rows"] == [(facts["artifact_id"], 2)] and facts["versions"] == ["v1"]
    assert facts["adapter_sha256"] == dpo_baseline["adapter_sha256"]
    with capsys.disabled():
        print(f"\nkill RayTrainWorker: killed at step {killed_at} (checkpoint "
              f"{at_kill['stages'][0]['checkpoint_step']}); attempt 2 resumed at step {second_attempt[0]} with loss "
              f"{baseline[second_attempt[0]]:.6f} as uninterrupted; {time.monotonic() - started:.1f} s")
