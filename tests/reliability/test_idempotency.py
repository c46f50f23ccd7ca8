"""Idempotent POST /jobs, on SQLite and Postgres, against a real uvicorn server on a free port.

The same Idempotency-Key with the same body gives one job, also when 20 clients send it at once: one 201,
nineteen 200 naming the same id, never a 500. The same key with another body gets 422 naming the header.
Keys belong to a tenant: another tenant's identical key makes its own job.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from databases import create_postgres_database, drop_postgres_database
from servers import served
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError
from tenant_data import job_spec, make_settings, new_key

from services.app import create_app
from services.db.models import Job, StageRun
from services.db.session import make_engine, make_sessionmaker, upgrade

CLIENTS = 20
ROUNDS = int(os.environ.get("ALIGN_IDEMPOTENCY_ROUNDS", "1"))
"""Races per database: each sends CLIENTS requests at once with a fresh key."""


@contextmanager
def live_server(settings, session_factory) -> Iterator[str]:
    """The app on a free port, served by uvicorn from a thread of this process; yields its URL."""
    with served(create_app(settings, session_factory=session_factory), limit_concurrency=200, backlog=256) as url:
        yield url


@pytest.fixture
def server(tmp_path, database_url, session_factory):
    settings = make_settings(tmp_path, database_url)
    with live_server(settings, session_factory) as url:
        yield url, settings


def headers(key: str, idempotency_key: str | None = None) -> dict[str, str]:
    sent = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        sent["Idempotency-Key"] = idempotency_key
    return sent


def race_spec(name: str = "race") -> dict:
    """A two-stage job on built-in data: its checks take milliseconds, so the requests of a race reach the
    database together."""
    return {"name": name, "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": "builtin:parity/sft"}, "max_steps": 2},
                       {"type": "dpo", "data": {"path": "builtin:parity/prefs"}, "max_steps": 2}]}


def count_jobs(session_factory, idempotency_key: str) -> tuple[int, int]:
    """Jobs with the key, and stage runs of those jobs."""
    with session_factory() as session:
        jobs = session.scalar(select(func.count()).select_from(Job).where(Job.idempotency_key == idempotency_key))
        runs = session.scalar(select(func.count()).select_from(StageRun).join(Job)
                              .where(Job.idempotency_key == idempotency_key))
        return jobs, runs


def race(url: str, requests: list[tuple[dict, dict]]) -> list[httpx.Response]:
    """Send every (body, headers) at once, one client each, released together by a barrier."""
    barrier = threading.Barrier(len(requests))

    def send(request):
        body, sent_headers = request
        with httpx.Client(base_url=url, timeout=120) as client:
            client.get("/healthz")  # connect before the barrier: the POSTs leave together
            barrier.wait()
            return client.post("/jobs", json=body, headers=sent_headers)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def test_replays_and_conflicts(server, session_factory):
    url, settings = server
    _, key_a = new_key(session_factory, "tenant-a")
    _, key_b = new_key(session_factory, "tenant-b")
    spec = job_spec(settings)
    with httpx.Client(base_url=url, timeout=120) as client:
        first = client.post("/jobs", json=spec, headers=headers(key_a, "order-1"))
        assert first.status_code == 201, first.text
        job_id = first.json()["id"]
        again = client.post("/jobs", json=spec, headers=headers(key_a, "order-1"))
        assert again.status_code == 200 and again.json()["id"] == job_id
        # The same spec written with its defaults filled in is the same request.
        filled = client.post("/jobs/validate", json=spec, headers=headers(key_a)).json()["spec"]
        assert client.post("/jobs", json=filled, headers=headers(key_a, "order-1")).json()["id"] == job_id
        other = client.post("/jobs", json=job_spec(settings, name="other"), headers=headers(key_a, "order-1"))
        assert other.status_code == 422
        assert [item["field"] for item in other.json()["detail"]] == ["Idempotency-Key"]
        assert "'order-1' was already used for a different job spec" in other.json()["detail"][0]["message"]
        # A replay after the job changed still names it; another tenant's same key is its own job.
        assert client.post(f"/jobs/{job_id}/cancel", headers=headers(key_a)).json()["status"] == "cancelled"
        replay = client.post("/jobs", json=spec, headers=headers(key_a, "order-1"))
        assert replay.status_code == 200 and replay.json()["id"] == job_id and replay.json()["status"] == "cancelled"
        theirs = client.post("/jobs", json=spec, headers=headers(key_b, "order-1"))
        assert theirs.status_code == 201 and theirs.json()["id"] != job_id
        assert client.get(f"/jobs/{job_id}", headers=headers(key_b)).status_code == 404
        # Without a key every POST is a new job.
        plain = {client.post("/jobs", json=spec, headers=headers(key_a)).json()["id"] for _ in range(2)}
        assert len(plain) == 2
        for bad in ("k" * 201, ""):
            refused = client.post("/jobs", json=spec, headers=headers(key_a, bad))
            assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "Idempotency-Key"
    assert count_jobs(session_factory, "order-1") == (2, 4)


def test_concurrent_posts_with_one_key_make_one_job(server, session_factory, database_url, record_property):
    url, _ = server
    _, key = new_key(session_factory, "tenant-a")
    spec = race_spec()
    with httpx.Client(base_url=url, timeout=120) as client:  # warm-up: the first spec check loads its modules
        assert client.post("/jobs/validate", json=spec, headers=headers(key)).status_code == 200
    # The server runs in this process on this engine: count the inserts that lost to the unique constraint,
    # the path a race takes once both requests found no job for the key.
    lost = []
    engine = session_factory.kw["bind"]

    def count_lost(context):
        if isinstance(context.sqlalchemy_exception, IntegrityError):
            lost.append(context.original_exception)

    event.listen(engine, "handle_error", count_lost)
    seconds, failures = [], 0
    try:
        for round_ in range(ROUNDS):
            idempotency_key = f"race-{round_}"
            started = time.monotonic()
            answers = race(url, [(spec, headers(key, idempotency_key))] * CLIENTS)
            seconds.append(time.monotonic() - started)
            statuses = Counter(response.status_code for response in answers)
            ids = {response.json().get("id") for response in answers}
            failures += statuses != Counter({201: 1, 200: CLIENTS - 1}) or len(ids) != 1
            assert statuses == Counter({201: 1, 200: CLIENTS - 1}), [r.text for r in answers if r.status_code >= 300]
            assert len(ids) == 1 and None not in ids
            assert count_jobs(session_factory, idempotency_key) == (1, 2)
    finally:
        event.remove(engine, "handle_error", count_lost)
    database = database_url.split(":")[0]
    if database.startswith("postgres"):
        assert lost, "no request lost the insert race: the rounds did not race"
    else:  # SQLite: a write transaction takes the lock up front, so the second request finds the first's job
        assert not lost
    figures = {"database": database, "rounds": ROUNDS, "clients": CLIENTS, "failures": failures,
               "lost_inserts": len(lost), "seconds": [round(s, 2) for s in seconds]}
    record_property("idempotency_race", figures)
    print(f"\n{figures}")


def test_concurrent_posts_with_one_key_and_two_bodies(server, session_factory):
    url, _ = server
    _, key = new_key(session_factory, "tenant-a")
    first, second = race_spec("first"), race_spec("second")
    with httpx.Client(base_url=url, timeout=120) as client:
        assert client.post("/jobs/validate", json=first, headers=headers(key)).status_code == 200
    requests = [(first if i % 2 else second, headers(key, "mixed")) for i in range(CLIENTS)]
    answers = race(url, requests)
    assert all(response.status_code in (200, 201, 422) for response in answers), [r.text for r in answers]
    made = [response.json() for response in answers if response.status_code in (200, 201)]
    winner = {job["name"] for job in made}
    assert len(winner) == 1 and len({job["id"] for job in made}) == 1
    assert len(made) == CLIENTS // 2  # every request with the winner's body names its job
    refused = [response.json()["detail"] for response in answers if response.status_code == 422]
    assert len(refused) == CLIENTS // 2
    assert all(detail[0]["field"] == "Idempotency-Key" for detail in refused)
    assert Counter(response.status_code for response in answers)[201] == 1
    assert count_jobs(session_factory, "mixed") == (1, 2)


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_stricter_database_default_does_not_break_the_race(tmp_path, isolation):
    """A Postgres database whose ``default_transaction_isolation`` is stricter than read committed: the
    service's connections still read committed rows, so the requests that lose the insert find the job."""
    url = create_postgres_database("align_isolation")
    try:
        admin = make_engine(url, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            name = url.rsplit("/", 1)[1]
            connection.execute(text(f"ALTER DATABASE \"{name}\" SET default_transaction_isolation = '{isolation}'"))
            assert connection.execute(text("SHOW default_transaction_isolation")).scalar() == "read committed"
        admin.dispose()
        upgrade(url)
        engine = make_engine(url)
        with engine.connect() as connection:  # a new connection sees the database's default; the engine sets its own
            assert connection.execute(text("SHOW default_transaction_isolation")).scalar() == isolation
            assert connection.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
        session_factory = make_sessionmaker(engine)
        _, key = new_key(session_factory, "tenant-a")
        with live_server(make_settings(tmp_path, url), session_factory) as base:
            assert httpx.post(f"{base}/jobs/validate", json=race_spec(), headers=headers(key), timeout=120).is_success
            answers = race(base, [(race_spec(), headers(key, "strict"))] * CLIENTS)
        statuses = Counter(response.status_code for response in answers)
        assert statuses == Counter({201: 1, 200: CLIENTS - 1}), [r.text for r in answers if r.status_code >= 300]
        assert len({response.json()["id"] for response in answers}) == 1
        assert count_jobs(session_factory, "strict") == (1, 2)
        engine.dispose()
    finally:
        drop_postgres_database(url)
