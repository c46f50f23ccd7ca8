"""Races on the real Postgres, with a Ray that records submissions (Ray is not under test here):

- a zombie attempt, one that wakes after its lease was rescued, is fenced: every report gets 409 and its
  artifact is never recorded, while the attempt that replaced it goes on;
- two dispatchers rescue the same expired lease at once, over many rounds: exactly one wins each round;
- 8 dispatchers, each with its own engine, against 500 queued stages: each stage is claimed exactly once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from fakes import RecordingRay
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from align.artifacts import ArtifactStore
from align.spec import parse_spec
from services.app import create_app
from services.db import auth, events, jobs
from services.db.models import Artifact, StageRun, utcnow
from services.db.session import make_engine, make_sessionmaker
from services.dispatcher import Dispatcher
from services.settings import Settings
from workers.report import manifest_hash

SECRET = "races-secret"
RESCUE_ROUNDS = 50
DISPATCHERS, STAGES = 8, 500


@pytest.fixture
def database_url(postgres_url) -> str:
    return postgres_url


def settings_for(database_url: str, tmp_path, **extra) -> Settings:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text(json.dumps(row) + "\n")
    values = {"database_url": database_url, "artifact_root": str(tmp_path / "artifacts"),
              "work_root": str(tmp_path / "work"), "data_roots": [str(data)], "model_roots": [str(data)],
              "report_secret": SECRET, "max_attempts": 3, "lease_seconds": 60, "dispatcher_poll_seconds": 0.01,
              "ray_address": "http://ray:8265", "run_dispatcher": False}
    return Settings(**{**values, **extra})


def one_stage_spec(settings: Settings, name: str = "race") -> dict:
    path = f"{settings.data_roots[0]}/sft.jsonl"
    return {"name": name, "base_model": "builtin:tiny", "stages": [{"type": "sft", "data": {"path": path}}]}


def new_jobs(session_factory, settings: Settings, count: int) -> list[str]:
    spec = parse_spec(one_stage_spec(settings))
    with session_factory.begin() as s:
        tenant_id = auth.create_tenant(s, f"t{time.monotonic_ns()}").id
        return [jobs.create_job(s, tenant_id, spec, None, None, max_attempts=3)[0].id for _ in range(count)]


def run_of(session_factory, job_id: str) -> StageRun:
    with session_factory() as s:
        return s.scalars(select(StageRun).where(StageRun.job_id == job_id)).one()


def expire_lease(session_factory, run_id: str) -> None:
    with session_factory.begin() as s:
        s.execute(update(StageRun).where(StageRun.id == run_id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def at_once(functions) -> list[BaseException]:
    """Run each function in its own thread, all released together; returns what they raised."""
    barrier, errors = threading.Barrier(len(functions)), []

    def run(function) -> None:
        try:
            barrier.wait(30)
            function()
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f,)) for f in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads), "a dispatcher hung"
    return errors


def dispatchers(settings: Settings, ray, count: int, **kwargs) -> tuple[list[Dispatcher], list]:
    """``count`` dispatchers, each with an engine (a connection pool) of its own, as separate processes have."""
    engines = [make_engine(settings.database_url) for _ in range(count)]
    made = [Dispatcher(settings, make_sessionmaker(engine), ray, owner_id=f"d{i}", **kwargs)
            for i, engine in enumerate(engines)]
    return made, engines


def say(capsys, figures: list[str], text: str) -> None:
    figures.append(text)
    with capsys.disabled():
        print(f"\n{text}")


def test_a_zombie_attempt_is_fenced_and_its_artifact_never_recorded(database_url, session_factory, tmp_path):
    settings = settings_for(database_url, tmp_path)
    ray = RecordingRay()
    dispatcher = Dispatcher(settings, session_factory, ray, owner_id="d1")
    store = ArtifactStore(settings.artifact_root)
    (job_id,) = new_jobs(session_factory, settings, 1)
    dispatcher.tick()
    run_id = run_of(session_factory, job_id).id
    ray.set_status(f"align-{run_id}-a1", "RUNNING")
    expire_lease(session_factory, run_id)
    dispatcher.tick()  # rescued: attempt 1's Ray job stopped, attempt 2 claimed and submitted
    ray.set_status(f"align-{run_id}-a2", "RUNNING")
    rescued = run_of(session_factory, job_id)
    assert (rescued.state, rescued.attempt) == ("running", 2)
    assert ray.stopped[f"align-{run_id}-a1"] == 1 and ray.submitted[f"align-{run_id}-a2"] == 1

    def report(client, attempt: int, type: str, payload: dict):
        body = {"stage_run_id": run_id, "attempt": attempt, "type": type, "payload": payload}
        token = settings.report_token(run_id, attempt)
        return client.post("/internal/reports", json=body, headers={"Authorization": f"Bearer {token}"})

    def artifact_payload(attempt: int) -> dict:
        out = tmp_path / f"out-a{attempt}"
        out.mkdir()
        (out / "adapter_model.safetensors").write_bytes(bytes([attempt]) * 1000)
        stage = {"type": "sft", "index": 0, "name": "sft", "stage_run_id": run_id, "attempt": attempt}
        published = store.publish(out, lineage="race.sft", kind="adapter", stage=stage, base_model="builtin:tiny",
                                   spec_hash="sha256:spec")
        manifest = published.manifest
        return {"artifact_id": manifest.artifact_id, "uri": published.uri, "lineage": manifest.lineage,
                "version": manifest.version, "kind": manifest.kind, "parents": [], "metrics": {},
                "manifest_hash": manifest_hash(store, published.uri)}

    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        assert report(client, 2, "heartbeat", {"step": 1, "total_steps": 4}).status_code == 200
        before = run_of(session_factory, job_id)
        zombie = {
            "heartbeat": {"step": 9, "total_steps": 4},
            "metrics": {"step": 9, "loss": 0.1},
            "checkpoint": {"uri": "/zombie/ckpt", "step": 9},
            "message": {"level": "info", "text": "zombie"},
            "samples": {"samples": [{"step": 9, "prompt": "p", "completion": "c", "score": 0.0}]},
            "artifact": artifact_payload(1),
            "failed": {"code": "oom", "message": "zombie", "retryable": False},
        }
        answers = {type: report(client, 1, type, payload) for type, payload in zombie.items()}
        assert {type: answer.status_code for type, answer in answers.items()} == dict.fromkeys(zombie, 409)
        after = run_of(session_factory, job_id)
        # Nothing of the zombie's reached the attempt that replaced it: not its lease, progress or checkpoint.
        assert (after.attempt, after.lease_expires_at, after.progress_step, after.checkpoint_uri, after.error_code) \
            == (2, before.lease_expires_at, 1, before.checkpoint_uri, None)

        winner = artifact_payload(2)
        assert report(client, 2, "artifact", winner).status_code == 200
        ray.set_status(f"align-{run_id}-a2", "SUCCEEDED")
        dispatcher.tick()
        job = client.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {mint_key(session_factory, job_id)}"})
        assert job.json()["status"] == "succeeded"
        assert job.json()["stages"][0]["artifact_id"] == winner["artifact_id"]

    with session_factory() as s:
        rows = [(a.id, a.attempt) for a in s.scalars(select(Artifact))]
        zombie_events = [e for e in events.list_events(s, job_id, limit=1000) if e.attempt == 1
                         and e.type in ("metrics", "samples")]
    assert rows == [(winner["artifact_id"], 2)], "the zombie's artifact was never recorded"
    assert zombie_events == []
    # The zombie's version is in the store, complete but unreferenced; the recorded one is the next.
    assert store.list_versions("race.sft") == [1, 2]


def mint_key(session_factory, job_id: str) -> str:
    from services.db.models import Job

    with session_factory.begin() as s:
        tenant_id = s.get(Job, job_id).tenant_id
        return auth.create_api_key(s, tenant_id, "reader")[1]


def test_two_rescuers_of_one_expired_lease_exactly_one_wins(database_url, tmp_path, capsys, figures):
    settings = settings_for(database_url, tmp_path)
    ray = RecordingRay()
    rescuers, engines = dispatchers(settings, ray, 2)
    session_factory = make_sessionmaker(engines[0])
    wins, failures = Counter(), []
    started = time.monotonic()
    for round_ in range(RESCUE_ROUNDS):
        # Half the rounds Ray ends the job as soon as it is stopped; in the others it ends a tick later.
        ray.stop_ends_job = round_ % 2 == 0
        (job_id,) = new_jobs(session_factory, settings, 1)
        rescuers[round_ % 2].claim_and_submit()
        run_id = run_of(session_factory, job_id).id
        first, second = f"align-{run_id}-a1", f"align-{run_id}-a2"
        ray.set_status(first, "RUNNING")
        expire_lease(session_factory, run_id)
        before = [d.metrics.rescues._value.get() for d in rescuers]
        errors = at_once([d.tick for d in rescuers])
        if not ray.stop_ends_job:
            assert run_of(session_factory, job_id).attempt == 1, "requeued before Ray confirmed the end"
            ray.set_status(first, "STOPPED")
            errors += at_once([d.tick for d in rescuers])
        gained = [d.metrics.rescues._value.get() - b for d, b in zip(rescuers, before, strict=True)]
        run = run_of(session_factory, job_id)
        with session_factory() as s:
            retries = [e.payload for e in events.list_events(s, job_id, type="state", limit=1000)
                       if e.payload["to"] == "retrying"]
        outcome = (errors, sorted(gained), len(retries), ray.submitted[second], (run.state, run.attempt))
        if outcome != ([], [0, 1], 1, 1, ("running", 2)):
            failures.append((round_, outcome))
        wins[f"d{gained.index(1)}" if 1 in gained else "none"] += 1
        with session_factory.begin() as s:  # this round's stage leaves the next rounds' ticks alone
            s.execute(update(StageRun).where(StageRun.id == run_id).values(state="succeeded", lease_owner=None))
    seconds = time.monotonic() - started
    for engine in engines:
        engine.dispose()
    say(capsys, figures, f"rescuer race: {RESCUE_ROUNDS} rounds in {seconds:.1f} s, {len(failures)} failures, "
                f"rescues won {dict(sorted(wins.items()))}")
    assert failures == []
    assert sum(wins.values()) == RESCUE_ROUNDS and "none" not in wins


def test_eight_dispatchers_claim_each_of_500_stages_exactly_once(database_url, tmp_path, capsys, figures):
    settings = settings_for(database_url, tmp_path)
    ray = RecordingRay()
    claimers, engines = dispatchers(settings, ray, DISPATCHERS, max_claims_per_tick=1000)
    session_factory = make_sessionmaker(engines[0])
    job_ids = new_jobs(session_factory, settings, STAGES)
    started = time.monotonic()
    errors = at_once([d.claim_and_submit for d in claimers])
    seconds = time.monotonic() - started
    with session_factory() as s:
        runs = list(s.scalars(select(StageRun)))
        queued = s.scalar(select(func.count()).select_from(StageRun).where(StageRun.state == "queued"))
    for engine in engines:
        engine.dispose()
    per_owner = Counter(run.lease_owner for run in runs)
    say(capsys, figures, f"contention: {STAGES} stages claimed by {DISPATCHERS} dispatchers in {seconds:.2f} s "
                f"({STAGES / seconds:.0f} claims/s); per dispatcher {sorted(per_owner.values())}")
    assert errors == []
    assert len(runs) == len(job_ids) == STAGES and queued == 0
    assert {(run.state, run.attempt) for run in runs} == {("running", 1)}
    assert set(ray.submitted) == {f"align-{run.id}-a1" for run in runs}
    assert set(ray.submitted.values()) == {1}, "a stage was submitted twice"
    assert set(per_owner) <= {d.owner_id for d in claimers} and sum(per_owner.values()) == STAGES
