"""Kill -9 the dispatcher mid-stage, then start another: every job completes exactly once, no stage runs
twice at the same attempt, and the DPO adapter is bit for bit the one of an uninterrupted run.

One shared local Ray and API server (conftest.py); each trial kills the running `align dispatcher` at
another point of the stage (Ray has the job; training; after a checkpoint; near the end). 4 trials in CI
(each point once), ``--trials N`` for more.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest
from trial_jobs import STEPS, dpo_spec, job_facts, ray_submissions, wait_finished, wait_until

pytestmark = pytest.mark.slow

CI_TRIALS = 4


def progress(job: dict) -> int:
    return job["stages"][0]["progress"]["step"] or 0


KILL_POINTS = {
    "submitted": lambda service, job: bool(ray_submissions(service, job["stages"][0]["id"])),
    "training": lambda service, job: progress(job) >= 1,
    "checkpointed": lambda service, job: (job["stages"][0]["checkpoint_step"] or 0) >= 2,
    "near the end": lambda service, job: progress(job) >= STEPS - 2,
}


def pytest_generate_tests(metafunc) -> None:
    if "trial" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--trials")
        metafunc.parametrize("trial", range(chosen if chosen is not None else CI_TRIALS))


@pytest.fixture(scope="module")
def tally(figures):
    """Trials run, failed and their time, added to the session's reliability figures once they are done."""
    tally = {"trials": 0, "failures": 0, "seconds": 0.0, "points": Counter()}
    yield tally
    figures.append(f"kill -9 dispatcher: {tally['trials']} trials, {tally['failures']} failures, "
                   f"{tally['seconds']:.0f} s of trials, kill points {dict(tally['points'])}")


def test_a_dispatcher_killed_mid_stage_loses_and_repeats_nothing(
    trial, fault_service, dpo_baseline, small_model, small_data, tally, capsys
):
    point = list(KILL_POINTS)[trial % len(KILL_POINTS)]
    started = time.monotonic()
    tally["trials"] += 1
    tally["failures"] += 1  # taken back at the end
    victim = fault_service.keep_dispatching()
    job = fault_service.client.submit(dpo_spec(small_model, small_data, f"kill-dispatcher-{trial}"))
    at_kill = wait_until(fault_service, job["id"], lambda j: KILL_POINTS[point](fault_service, j), what=point)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(30) == -signal.SIGKILL
    tally["points"][point if at_kill["status"] == "running" else f"{point} (ended first)"] += 1
    fault_service.keep_dispatching()
    job = wait_finished(fault_service, job["id"])
    facts = job_facts(fault_service, job)
    seconds = time.monotonic() - started

    assert facts["status"] == "succeeded", (job, fault_service.log_of(str(fault_service.started)))
    stage_run = job["stages"][0]["id"]
    # Exactly once: one attempt, one Ray job, one artifact row, one stored version.
    assert facts["attempt"] == 1
    assert facts["ray"] == {f"align-{stage_run}-a1": "SUCCEEDED"}
    assert facts["artifact_rows"] == [(facts["artifact_id"], 1)]
    assert facts["versions"] == ["v1"]
    # No step trained (and reported) twice, and the same losses and adapter as the uninterrupted run.
    assert facts["loss_reports"] == Counter({(1, step): 1 for step in range(1, STEPS + 1)})
    assert facts["losses"] == dpo_baseline["losses"]
    assert facts["adapter_sha256"] == dpo_baseline["adapter_sha256"]
    tally["failures"] -= 1
    tally["seconds"] += seconds
    with capsys.disabled():
        print(f"\ntrial {trial}: killed at '{point}' (stage {at_kill['stages'][0]['state']}, step "
              f"{progress(at_kill)}), finished in {seconds:.1f} s; baseline {dpo_baseline['seconds']:.1f} s")
