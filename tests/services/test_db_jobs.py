"""The stage state machine and the job queries, on SQLite and on Postgres."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from align.lineage import MissingInput
from align.spec import parse_spec
from services.db import artifacts, auth, events, jobs, leases, reports, transitions
from services.db.models import Event, Job, StageRun, utcnow

THREE_STAGES = [
    {"type": "sft", "data": {"path": "data/sft.jsonl"}},
    {"type": "rm", "data": {"path": "data/prefs.jsonl"}},
    {"type": "dpo", "data": {"path": "data/prefs.jsonl"}},
]


def spec(name: str = "demo", stages: list[dict] = THREE_STAGES):
    return parse_spec({"name": name, "base_model": "builtin:tiny", "stages": stages})


@pytest.fixture
def tenant_id(session_factory) -> str:
    with session_factory.begin() as s:
        return auth.create_tenant(s, "acme").id


def new_job(session_factory, tenant_id, key=None, fingerprint=None, stages=THREE_STAGES) -> str:
    with session_factory.begin() as s:
        job, created = jobs.create_job(s, tenant_id, spec(stages=stages), key, fingerprint, max_attempts=3)
        assert created
        return job.id


def states(session_factory, job_id) -> list[tuple[str, int]]:
    with session_factory() as s:
        runs = s.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.index))
        return [(r.state, r.attempt) for r in runs]


def run_ids(session_factory, job_id) -> list[str]:
    with session_factory() as s:
        return list(s.scalars(select(StageRun.id).where(StageRun.job_id == job_id).order_by(StageRun.index)))


def claim(session_factory, owner="d1", lease=60.0) -> StageRun | None:
    with session_factory.begin() as s:
        return transitions.claim_next(s, owner, lease)


def report(session_factory, run_id, attempt, type, payload) -> bool:
    with session_factory.begin() as s:
        return reports.apply_report(s, run_id, attempt, type, payload, lease_seconds=60)


def artifact_payload(artifact_id: str, kind: str = "adapter") -> dict:
    return {
        "artifact_id": artifact_id,
        "uri": f"/store/{artifact_id}",
        "lineage": "demo.sft",
        "version": 1,
        "kind": kind,
        "manifest_hash": "sha256:" + "0" * 64,
        "parents": [],
        "metrics": {"loss": 1.5},
    }


def inputs_of(s, run: StageRun):
    """What the stage run starts from, its job's spec read back from the database."""
    return artifacts.stage_inputs(s, run, parse_spec(s.get(Job, run.job_id).spec))


def job_status(session_factory, tenant_id, job_id) -> str:
    with session_factory() as s:
        return jobs.job_status(jobs.get_job(s, tenant_id, job_id))


def test_create_job_queues_the_first_stage_only(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    assert job_id.startswith("job_") and len(job_id) == 36
    assert states(session_factory, job_id) == [("queued", 0), ("pending", 0), ("pending", 0)]
    with session_factory() as s:
        job = jobs.get_job(s, tenant_id, job_id)
        assert [r.name for r in job.stage_runs] == ["sft", "rm", "dpo"]
        assert [r.max_attempts for r in job.stage_runs] == [3, 3, 3]
        assert job.spec_hash == spec().hash()
        assert jobs.job_status(job) == "queued"
        created = [(e.payload["from"], e.payload["to"]) for e in events.list_events(s, job_id, type="state")]
        assert created == [(None, "queued"), (None, "pending"), (None, "pending")]


def test_idempotent_create(session_factory, tenant_id):
    first = new_job(session_factory, tenant_id, key="k1", fingerprint="f1")
    with session_factory.begin() as s:
        again, created = jobs.create_job(s, tenant_id, spec(), "k1", "f1", max_attempts=3)
        assert (again.id, created) == (first, False)
    with session_factory.begin() as s, pytest.raises(jobs.IdempotencyConflict, match="k1"):
        jobs.create_job(s, tenant_id, spec(), "k1", "f2", max_attempts=3)
    with session_factory.begin() as s:
        other_tenant = auth.create_tenant(s, "other").id
        theirs, created = jobs.create_job(s, other_tenant, spec(), "k1", "f2", max_attempts=3)
        assert created and theirs.id != first
        assert s.scalar(select(func.count()).select_from(Job)) == 2
        assert s.scalar(select(func.count()).select_from(StageRun)) == 6


def test_claim_is_fenced_by_the_attempt(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    run = claim(session_factory)
    assert (run.job_id, run.index, run.state, run.attempt) == (job_id, 0, "running", 1)
    assert run.submission_id == f"align-{run.id}-a1"
    assert run.lease_owner == "d1" and run.lease_expires_at > utcnow() + timedelta(seconds=50)
    assert claim(session_factory) is None
    with session_factory.begin() as s:
        assert not transitions.succeed(s, run.id, 0)
        assert not transitions.claim(s, run.id, 1, "d2", 60)
    assert not report(session_factory, run.id, 0, "heartbeat", {"step": 1, "total_steps": 10})
    assert report(session_factory, run.id, 1, "heartbeat", {"step": 1, "total_steps": 10})
    with session_factory() as s:
        assert (s.get(StageRun, run.id).progress_step, s.get(StageRun, run.id).total_steps) == (1, 10)


def test_success_queues_the_next_stage_until_the_job_succeeds(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    for index in range(3):
        run = claim(session_factory)
        assert run.index == index
        assert job_status(session_factory, tenant_id, job_id) == "running"
        with session_factory.begin() as s:
            assert transitions.succeed(s, run.id, 1)
        expected = [("succeeded", 1)] * (index + 1) + [("queued", 0)] + [("pending", 0)] * (1 - index)
        assert states(session_factory, job_id) == expected[:3]
    assert job_status(session_factory, tenant_id, job_id) == "succeeded"


def test_failure_cancels_the_later_stages(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    run = claim(session_factory)
    with session_factory.begin() as s:
        assert transitions.fail_attempt(s, run.id, 1, "bad_data", "row 3: no 'chosen'", "data.path", retryable=False)
    assert states(session_factory, job_id) == [("failed", 1), ("cancelled", 0), ("cancelled", 0)]
    assert job_status(session_factory, tenant_id, job_id) == "failed"
    with session_factory() as s:
        failed = s.get(StageRun, run.id)
        assert (failed.error_code, failed.error_field, failed.retryable) == ("bad_data", "data.path", False)
        assert failed.lease_owner is None and failed.finished_at is not None


def test_terminal_states_absorb(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id, stages=THREE_STAGES[:1])
    run = claim(session_factory)
    with session_factory.begin() as s:
        assert transitions.succeed(s, run.id, 1)
    with session_factory.begin() as s:
        assert not transitions.fail(s, run.id, 1, "late", "too late")
        assert not transitions.cancel(s, run.id, "running", 1)
        assert transitions.fail_attempt(s, run.id, 1, "late", "too late") is None
        with pytest.raises(ValueError, match="no transition from 'succeeded'"):
            transitions.cancel(s, run.id, "succeeded", 1)
    assert not report(session_factory, run.id, 1, "heartbeat", {"step": 2, "total_steps": 2})
    with session_factory.begin() as s:
        assert jobs.job_status(jobs.cancel_job(s, tenant_id, job_id)) == "succeeded"
    assert states(session_factory, job_id) == [("succeeded", 1)]


def test_cancel_keeps_a_running_stage_leased_until_its_ray_job_ends(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    run = claim(session_factory)
    with session_factory.begin() as s:
        assert jobs.cancel_job(s, "someone-else", job_id) is None
        assert jobs.job_status(jobs.cancel_job(s, tenant_id, job_id)) == "cancelled"
    assert states(session_factory, job_id) == [("cancelled", 1), ("cancelled", 0), ("cancelled", 0)]
    with session_factory() as s:
        job = jobs.get_job(s, tenant_id, job_id)
        assert job.updated_at >= max(r.updated_at for r in job.stage_runs)
    assert not report(session_factory, run.id, 1, "heartbeat", {"step": 1, "total_steps": 9})
    with session_factory.begin() as s:
        assert [r.id for r in leases.cancelled_with_live_submission(s)] == [run.id]
        assert leases.release_cancelled(s, run.id, 1)
    with session_factory() as s:
        assert leases.cancelled_with_live_submission(s) == []


def test_retryable_failure_requeues_and_keeps_the_checkpoint(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id, stages=THREE_STAGES[:1])
    run = claim(session_factory)
    assert report(session_factory, run.id, 1, "checkpoint", {"step": 50, "uri": "/work/ckpt/step-50"})
    with session_factory.begin() as s:
        assert transitions.fail_attempt(s, run.id, 1, "worker_lost", "node died") == "queued"
    assert states(session_factory, job_id) == [("queued", 1)]
    with session_factory() as s:
        levels = [(e.payload["to"], e.level) for e in events.list_events(s, job_id, type="state")][-2:]
        assert levels == [("retrying", "warning"), ("queued", "info")]
    second = claim(session_factory)
    assert (second.attempt, second.checkpoint_uri, second.checkpoint_step) == (2, "/work/ckpt/step-50", 50)
    assert second.error_code is None and second.submission_id.endswith("-a2")
    assert not report(session_factory, run.id, 1, "metrics", {"step": 51, "loss": 0.5})
    with session_factory.begin() as s:
        assert transitions.fail_attempt(s, run.id, 2, "worker_lost", "node died") == "queued"
    third = claim(session_factory)
    with session_factory.begin() as s:
        assert transitions.fail_attempt(s, run.id, 3, "worker_lost", "node died") == "failed"
    with session_factory() as s:
        failed = s.get(StageRun, third.id)
        assert (failed.state, failed.attempt) == ("failed", 3)
        assert failed.error_message == "node died (gave up after 3 of 3 attempts)"


def test_reports_record_metrics_messages_and_artifacts(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    run = claim(session_factory, lease=1.0)
    with session_factory() as s:
        first_lease = s.get(StageRun, run.id).lease_expires_at
    for step, loss in ((1, 2.0), (2, 1.5)):
        assert report(session_factory, run.id, 1, "metrics", {"step": step, "loss": loss})
    assert report(session_factory, run.id, 1, "message", {"level": "warning", "text": "slow disk"})
    assert report(session_factory, run.id, 1, "artifact", artifact_payload("demo.sft-v1-0123456789ab"))
    assert report(session_factory, run.id, 1, "artifact", artifact_payload("demo.sft-v1-0123456789ab"))
    assert report(
        session_factory,
        run.id,
        1,
        "failed",
        {"code": "oom", "message": "CUDA out of memory", "field": None, "retryable": True},
    )
    with session_factory() as s:
        stored = s.get(StageRun, run.id)
        assert stored.lease_expires_at > first_lease + timedelta(seconds=50)
        assert (stored.progress_step, stored.error_code, stored.retryable) == (2, "oom", True)
        assert events.metrics(s, job_id) == {
            "sft": [{"step": 1, "loss": 2.0, "attempt": 1}, {"step": 2, "loss": 1.5, "attempt": 1}],
            "rm": [],
            "dpo": [],
        }
        messages = events.list_events(s, job_id, type="message")
        assert [(m.level, m.payload["text"]) for m in messages][:2] == [
            ("warning", "slow disk"),
            ("info", "published artifact demo.sft-v1-0123456789ab"),
        ]
        artifact = artifacts.get_artifact(s, tenant_id, "demo.sft-v1-0123456789ab")
        assert (artifact.job_id, artifact.attempt, artifact.metrics) == (job_id, 1, {"loss": 1.5})
        assert artifacts.artifact_for(s, run.id, 1).id == artifact.id and artifacts.artifact_for(s, run.id, 2) is None
        assert artifacts.get_artifact(s, "another-tenant", artifact.id) is None
        after = messages[0].id
        assert all(e.id > after for e in events.list_events(s, job_id, after_id=after))
        with pytest.raises(ValueError, match="unknown report type"):
            reports.apply_report(s, run.id, 1, "progress", {}, lease_seconds=60)


def test_a_samples_report_is_an_event_and_does_not_renew_the_lease(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    run = claim(session_factory, lease=1.0)
    with session_factory() as s:
        before = s.get(StageRun, run.id)
        lease, updated = before.lease_expires_at, before.updated_at
    samples = [
        {"step": 4, "prompt": "Is 7 odd?", "completion": "yes", "score": 0.75},
        {"step": 4, "prompt": "Is 8 odd?", "completion": "no", "score": -0.25},
    ]
    assert report(session_factory, run.id, 1, "samples", {"samples": samples})
    assert not report(session_factory, run.id, 2, "samples", {"samples": samples})
    with session_factory() as s:
        after = s.get(StageRun, run.id)
        assert after.lease_expires_at == lease and after.progress_step is None and after.updated_at > updated
        (event,) = events.list_events(s, job_id, type="samples")
        assert (event.stage_run_id, event.attempt, event.level) == (run.id, 1, "info")
        assert event.payload == {"samples": samples}
        assert events.metrics(s, job_id) == {"sft": [], "rm": [], "dpo": []}


def test_a_claim_leases_the_run_to_its_dispatcher_for_the_lease_time(session_factory, tenant_id):
    new_job(session_factory, tenant_id)
    before = utcnow()
    run = claim(session_factory, lease=30)
    with session_factory() as s:
        (running,) = leases.running_stage_runs(s)
        assert (running.id, running.lease_owner) == (run.id, "d1")
        assert before + timedelta(seconds=30) <= running.lease_expires_at <= utcnow() + timedelta(seconds=30)


def test_stage_inputs_follow_the_latest_policy_stage(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id)
    sft_id, rm_id, dpo_id = run_ids(session_factory, job_id)
    for run_id, artifact_id in ((sft_id, "demo.sft-v1-aaaaaaaaaaaa"), (rm_id, "demo.rm-v1-bbbbbbbbbbbb")):
        run = claim(session_factory)
        assert run.id == run_id
        with session_factory.begin() as s:
            assert inputs_of(s, run) == (
                (None, [], None)
                if run_id == sft_id
                else ("/store/demo.sft-v1-aaaaaaaaaaaa", ["demo.sft-v1-aaaaaaaaaaaa"], None)
            )
        assert report(session_factory, run.id, 1, "artifact", artifact_payload(artifact_id))
        with session_factory.begin() as s:
            assert transitions.succeed(s, run.id, 1)
    dpo = claim(session_factory)
    with session_factory() as s:
        assert dpo.id == dpo_id
        assert inputs_of(s, dpo) == (
            "/store/demo.sft-v1-aaaaaaaaaaaa", ["demo.sft-v1-aaaaaaaaaaaa"], None
        )


SFT_RM_PPO = [
    {"type": "sft", "data": {"path": "data/sft.jsonl"}},
    {"type": "rm", "data": {"path": "data/prefs.jsonl"}},
    {"type": "ppo", "data": {"path": "data/prompts.jsonl"}},
]


def succeed(session_factory, run: StageRun, artifact_id: str, kind: str = "adapter") -> None:
    assert report(session_factory, run.id, run.attempt, "artifact", artifact_payload(artifact_id, kind))
    with session_factory.begin() as s:
        assert transitions.succeed(s, run.id, run.attempt)


def test_stage_inputs_give_a_ppo_stage_the_policy_and_the_reward_model(session_factory, tenant_id):
    job_id = new_job(session_factory, tenant_id, stages=SFT_RM_PPO)
    sft_id, rm_id, ppo_id = run_ids(session_factory, job_id)
    sft = claim(session_factory)
    assert sft.id == sft_id
    succeed(session_factory, sft, "demo.sft-v1-aaaaaaaaaaaa")
    # The rm stage's first attempt publishes and then fails: only the succeeded attempt's artifact counts.
    rm = claim(session_factory)
    assert rm.id == rm_id
    with session_factory.begin() as s:
        assert inputs_of(s, rm) == (
            "/store/demo.sft-v1-aaaaaaaaaaaa", ["demo.sft-v1-aaaaaaaaaaaa"], None
        )
    first_try = artifact_payload("demo.rm-v1-111111111111", "reward_model")
    assert report(session_factory, rm.id, 1, "artifact", first_try)
    with session_factory.begin() as s:
        assert transitions.fail_attempt(s, rm.id, 1, "worker_lost", "node died") == "queued"
    rm = claim(session_factory)
    assert (rm.id, rm.attempt) == (rm_id, 2)
    succeed(session_factory, rm, "demo.rm-v2-222222222222", "reward_model")
    ppo = claim(session_factory)
    assert ppo.id == ppo_id
    with session_factory() as s:
        inputs = inputs_of(s, ppo)
    assert inputs == (
        "/store/demo.sft-v1-aaaaaaaaaaaa",
        ["demo.sft-v1-aaaaaaaaaaaa", "demo.rm-v2-222222222222"],
        "/store/demo.rm-v2-222222222222",
    )
    assert (inputs.start_policy, inputs.reward_model) == (inputs[0], inputs[2])


def test_stage_inputs_use_the_reward_model_the_stage_names(session_factory, tenant_id):
    # An earlier job of the tenant trains the reward model.
    first = new_job(session_factory, tenant_id, stages=SFT_RM_PPO[:2])
    succeed(session_factory, claim(session_factory), "demo.sft-v1-aaaaaaaaaaaa")
    succeed(session_factory, claim(session_factory), "demo.rm-v1-bbbbbbbbbbbb", "reward_model")
    assert states(session_factory, first) == [("succeeded", 1), ("succeeded", 1)]
    # A job with its own rm stage that names the earlier reward model scores with the named one.
    named = {**SFT_RM_PPO[2], "reward_model": "artifact:demo.rm-v1-bbbbbbbbbbbb"}
    second = new_job(session_factory, tenant_id, stages=[*SFT_RM_PPO[:2], named])
    succeed(session_factory, claim(session_factory), "demo.sft-v2-cccccccccccc")
    succeed(session_factory, claim(session_factory), "demo.rm-v2-dddddddddddd", "reward_model")
    ppo = claim(session_factory)
    assert (ppo.job_id, ppo.index) == (second, 2)
    with session_factory() as s:
        assert inputs_of(s, ppo) == (
            "/store/demo.sft-v2-cccccccccccc",
            ["demo.sft-v2-cccccccccccc", "demo.rm-v1-bbbbbbbbbbbb"],
            "/store/demo.rm-v1-bbbbbbbbbbbb",
        )
    # As a job's first stage it has no policy: the reward model is its only parent.
    alone = new_job(session_factory, tenant_id, stages=[named])
    ppo = claim(session_factory)
    assert ppo.job_id == alone
    with session_factory() as s:
        assert inputs_of(s, ppo) == (
            None, ["demo.rm-v1-bbbbbbbbbbbb"], "/store/demo.rm-v1-bbbbbbbbbbbb"
        )


def test_stage_inputs_refuse_a_reward_model_they_cannot_find(session_factory, tenant_id):
    first = new_job(session_factory, tenant_id, stages=SFT_RM_PPO[1:2])
    succeed(session_factory, claim(session_factory), "demo.rm-v1-bbbbbbbbbbbb", "reward_model")
    assert states(session_factory, first) == [("succeeded", 1)]
    named = {**SFT_RM_PPO[2], "reward_model": "artifact:demo.rm-v1-bbbbbbbbbbbb"}
    with session_factory.begin() as s:
        other_tenant = auth.create_tenant(s, "other").id
    new_job(session_factory, other_tenant, stages=[named])
    ppo = claim(session_factory)
    with session_factory() as s, pytest.raises(MissingInput) as missing:
        inputs_of(s, ppo)
    assert missing.value.field == "stages[0].reward_model"
    assert "no artifact 'artifact:demo.rm-v1-bbbbbbbbbbbb'" in missing.value.message


def test_list_jobs_pages_and_filters_by_derived_status(session_factory, tenant_id):
    ids = [new_job(session_factory, tenant_id, stages=THREE_STAGES[:1]) for _ in range(5)]
    run = claim(session_factory)
    assert run.job_id == ids[0]
    with session_factory() as s:
        page, cursor = jobs.list_jobs(s, tenant_id, limit=2)
        assert [j.id for j in page] == ids[::-1][:2]
        page, cursor = jobs.list_jobs(s, tenant_id, cursor=cursor, limit=2)
        assert [j.id for j in page] == ids[::-1][2:4]
        page, cursor = jobs.list_jobs(s, tenant_id, cursor=cursor, limit=2)
        assert ([j.id for j in page], cursor) == ([ids[0]], None)
        assert [j.id for j in jobs.list_jobs(s, tenant_id, state="running")[0]] == [ids[0]]
        assert len(jobs.list_jobs(s, tenant_id, state="queued")[0]) == 4
        assert jobs.list_jobs(s, tenant_id, state="succeeded")[0] == []
        assert jobs.list_jobs(s, "nobody")[0] == [] and jobs.get_job(s, "nobody", ids[0]) is None


def test_api_keys_are_stored_hashed(session_factory, tenant_id):
    with session_factory.begin() as s:
        key, plaintext = auth.create_api_key(s, tenant_id, "ci")
        assert key.key_hash == auth.hash_key(plaintext) and plaintext not in key.key_hash
    with session_factory.begin() as s:
        assert auth.tenant_for_key(s, plaintext).id == tenant_id
        assert auth.tenant_for_key(s, plaintext + "x") is None
        s.get(type(key), key.id).revoked_at = utcnow()
    with session_factory() as s:
        assert auth.tenant_for_key(s, plaintext) is None


def test_concurrent_claims_take_each_stage_run_once(session_factory, tenant_id):
    count = 24
    for _ in range(count):
        new_job(session_factory, tenant_id, stages=THREE_STAGES[:1])
    claimed: dict[str, list[str]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def claim_all(owner: str) -> None:
        start.wait()
        while (run := claim(session_factory, owner)) is not None:
            claimed[owner].append(run.id)

    threads = [threading.Thread(target=claim_all, args=(owner,)) for owner in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    everything = claimed["a"] + claimed["b"]
    assert len(everything) == len(set(everything)) == count
    with session_factory() as s:
        runs = list(s.scalars(select(StageRun)))
        assert {(r.state, r.attempt) for r in runs} == {("running", 1)}
        assert {r.id: r.lease_owner for r in runs} == {i: o for o in claimed for i in claimed[o]}
        claims = s.scalar(
            select(func.count()).select_from(Event).where(Event.payload["to"].as_string() == "running")
        )
        assert claims == count
