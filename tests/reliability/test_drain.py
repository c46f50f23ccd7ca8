"""SIGTERM drains a dispatcher: it claims nothing more, submits what it had claimed, and exits promptly,
leaving its running attempts training; another dispatcher follows them to the end. Nothing is stopped,
lost or run twice.

The first test is the drain itself on Postgres with a Ray that records submissions; the second sends
SIGTERM to a real `align dispatcher` mid-stage on the shared local Ray (conftest.py).
"""

from __future__ import annotations

import signal
import time

import pytest
from fakes import RecordingRay
from sqlalchemy import select
from test_races import new_jobs, settings_for
from trial_jobs import STEPS, dpo_spec, job_facts, ray_submissions, wait_finished, wait_until

from services.db import reports, transitions
from services.db.models import StageRun
from services.dispatcher import Dispatcher


@pytest.fixture
def database_url(postgres_url) -> str:
    return postgres_url


def runs(session_factory) -> dict[str, StageRun]:
    with session_factory() as s:
        return {run.job_id: run for run in s.scalars(select(StageRun))}


def test_a_drained_dispatcher_claims_nothing_and_leaves_its_attempts_to_another(
    database_url, session_factory, tmp_path
):
    settings = settings_for(database_url, tmp_path)
    ray = RecordingRay()
    leaving, staying = (Dispatcher(settings, session_factory, ray, owner_id=o) for o in ("leaving", "staying"))
    first = new_jobs(session_factory, settings, 2)
    leaving.tick()  # claims and submits both
    claimed_only = new_jobs(session_factory, settings, 1)
    with session_factory.begin() as s:  # claimed, then the process was told to stop before it submitted
        assert transitions.claim_next(s, "leaving", settings.lease_seconds) is not None
    queued = new_jobs(session_factory, settings, 2)

    assert leaving.drain() == 3
    leaving.tick()  # a tick already under way when the signal came claims nothing more either
    mine = runs(session_factory)
    assert {job: (mine[job].state, mine[job].lease_owner) for job in first + claimed_only} == \
        dict.fromkeys(first + claimed_only, ("running", "leaving"))
    assert {job: mine[job].state for job in queued} == dict.fromkeys(queued, "queued")
    submitted = {f"align-{mine[job].id}-a1" for job in first + claimed_only}
    assert set(ray.submitted) == submitted, "the claimed stage was submitted before leaving; nothing else"
    assert not ray.stopped, "no running attempt was stopped"

    staying.tick()
    for job in first + claimed_only + queued:
        run = runs(session_factory)[job]
        ray.set_status(run.submission_id, "RUNNING")
        with session_factory.begin() as s:
            payload = {"artifact_id": f"drain.sft-v{run.id[-4:]}-000000000000", "uri": f"/store/{run.id}",
                       "lineage": "drain.sft", "version": 1, "kind": "adapter", "manifest_hash": "sha256:00"}
            assert reports.apply_report(s, run.id, 1, "artifact", payload, lease_seconds=60)
        ray.set_status(run.submission_id, "SUCCEEDED")
    staying.tick()
    final = runs(session_factory)
    assert {(run.state, run.attempt) for run in final.values()} == {("succeeded", 1)}
    assert set(ray.submitted.values()) == {1} and len(ray.submitted) == 5
    assert not ray.stopped


@pytest.mark.slow
def test_sigterm_mid_stage_exits_promptly_and_another_dispatcher_finishes_the_stage(
    fault_service, dpo_baseline, small_model, small_data, capsys
):
    leaving = fault_service.keep_dispatching()
    name = str(fault_service.started)
    job = fault_service.client.submit(dpo_spec(small_model, small_data, "drain"))
    job = wait_until(fault_service, job["id"], lambda j: (j["stages"][0]["progress"]["step"] or 0) >= 1, 600,
                     "training")
    stage_run = job["stages"][0]["id"]
    sent = time.monotonic()
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(30) == 0
    exit_seconds = time.monotonic() - sent
    assert "1 running attempts left to the other dispatchers" in fault_service.log_of(name)
    assert ray_submissions(fault_service, stage_run)[f"align-{stage_run}-a1"] in ("RUNNING", "SUCCEEDED"), \
        "the attempt goes on training after its dispatcher left"

    fault_service.keep_dispatching()
    job = wait_finished(fault_service, job["id"])
    facts = job_facts(fault_service, job)
    with capsys.disabled():
        print(f"\nSIGTERM drain: exited {exit_seconds:.1f} s after the signal; stage ended {job['status']} "
              f"under another dispatcher, attempt {facts['attempt']}")
    assert exit_seconds < 10
    assert facts["status"] == "succeeded" and facts["attempt"] == 1
    assert facts["ray"] == {f"align-{stage_run}-a1": "SUCCEEDED"}
    assert facts["artifact_rows"] == [(facts["artifact_id"], 1)] and facts["versions"] == ["v1"]
    assert set(facts["loss_reports"].values()) == {1} and len(facts["loss_reports"]) == STEPS
    assert facts["adapter_sha256"] == dpo_baseline["adapter_sha256"]
