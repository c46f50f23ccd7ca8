"""Tenant isolation on every route that takes an id, on SQLite and Postgres.

The routes are read from the app itself: every path with a parameter, every method. Tenant B asking for
tenant A's job, events (JSON and SSE), metrics, cancel, artifact, files or export gets the same 404 as for
an id that does not exist, and A's job is left as it was. A route added with a parameter and not listed in
``CASES`` fails the test until it is covered here.
"""

from __future__ import annotations

import hashlib

import pytest
from fastapi import routing
from fastapi.testclient import TestClient
from starlette.routing import Mount
from tenant_data import make_settings, new_key, seed_job

from services.app import create_app

SSE = {"Accept": "text/event-stream"}
CASES: dict[tuple[str, str], list[dict]] = {
    ("GET", "/jobs/{job_id}"): [{}],
    ("POST", "/jobs/{job_id}/cancel"): [{}],
    ("GET", "/jobs/{job_id}/metrics"): [{}],
    ("GET", "/jobs/{job_id}/events"): [{}, {"params": {"after": 0, "limit": 5}}, {"headers": SSE},
                                       {"headers": {**SSE, "Last-Event-ID": "1"}}],
    ("GET", "/artifacts/{artifact_id}"): [{}],
    ("GET", "/artifacts/{artifact_id}/files/{path:path}"): [{"path": "adapter_config.json"},
                                                           {"path": "weights/adapter_model.safetensors"},
                                                           {"path": "manifest.json"}, {"path": "nope.bin"}],
    ("GET", "/artifacts/{artifact_id}/export"): [{}],
}
"""Every (method, path) with a path parameter, and the requests made to it (query, headers, a file path)."""


STATIC_MOUNTS = {"/static-offline-docs", "/ui"}
"""Mounted folders of static files (Swagger UI's assets, the dashboard): the same for every caller."""


def id_routes(app) -> tuple[set[tuple[str, str]], set[str]]:
    """(method, path) of every route whose path has a parameter, through included routers, and the paths of
    mounted applications."""
    routes, mounts = set(), set()
    for context in routing.iter_route_contexts(app.routes):
        if isinstance(context.route, Mount):
            mounts.add(context.path)
        elif "{" in context.path:
            routes |= {(method, context.path) for method in context.methods or ()}
    return routes, mounts


def missing_like(real_id: str) -> str:
    """An id of the same shape that names nothing."""
    tail = "0000" if not real_id.endswith("0000") else "1111"
    return real_id[:-4] + tail


@pytest.fixture
def world(tmp_path, database_url, session_factory):
    settings = make_settings(tmp_path, database_url)
    with TestClient(create_app(settings, session_factory=session_factory)) as client:
        tenant_a, key_a = new_key(session_factory, "tenant-a")
        _, key_b = new_key(session_factory, "tenant-b")
        seeded = seed_job(session_factory, settings, tenant_a)
        yield client, seeded, {"Authorization": f"Bearer {key_a}"}, {"Authorization": f"Bearer {key_b}"}


def request(client, method: str, template: str, ids: dict[str, str], case: dict, auth: dict):
    path = template.replace("{path:path}", case.get("path", ""))
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"{template}: a path parameter with no value in the test; add it to ids"
    return client.request(method, path, params=case.get("params"), headers={**auth, **case.get("headers", {})})


def answer(response, *ids: str) -> tuple[int, str, str]:
    """Status, content type and body with the requested ids replaced, to compare two answers."""
    body = response.text
    for index, value in enumerate(ids):
        body = body.replace(value, f"<id{index}>")
    return response.status_code, response.headers.get("content-type", ""), body


def test_every_id_route_is_covered(world):
    client, *_ = world
    routes, mounts = id_routes(client.app)
    assert routes == set(CASES), "a route with a path parameter is not covered by CASES"
    assert mounts == STATIC_MOUNTS, "a mounted application is not covered"


def test_another_tenant_gets_the_answer_of_a_missing_id(world):
    client, seeded, owner, other = world
    real = {"job_id": seeded.job_id, "artifact_id": seeded.artifact_id}
    missing = {name: missing_like(value) for name, value in real.items()}
    before = client.get(f"/jobs/{seeded.job_id}", headers=owner).json()
    events_before = client.get(f"/jobs/{seeded.job_id}/events", headers=owner).json()["data"]
    assert before["status"] == "running" and len(events_before) >= 4

    checked = 0
    for (method, template), cases in CASES.items():
        for case in cases:
            theirs = request(client, method, template, real, case, other)
            nothing = request(client, method, template, missing, case, other)
            label = f"{method} {template} {case}"
            assert theirs.status_code == 404, label
            assert answer(theirs, *real.values()) == answer(nothing, *missing.values()), label
            assert theirs.json()["detail"].startswith("no "), label
            # Without a key both are 401 alike: an unauthenticated caller learns nothing either.
            anonymous = request(client, method, template, real, case, {})
            assert anonymous.status_code == 401, label
            assert answer(anonymous) == answer(request(client, method, template, missing, case, {})), label
            checked += 1
    assert checked == sum(map(len, CASES.values())) == 13

    # Nothing of A's moved: the cancel did not cancel, no event was added, B lists nothing.
    after = client.get(f"/jobs/{seeded.job_id}", headers=owner).json()
    assert after == before
    assert client.get(f"/jobs/{seeded.job_id}/events", headers=owner).json()["data"] == events_before
    assert client.get("/jobs", headers=other).json() == {"data": [], "next_cursor": None}


def test_the_owner_reaches_every_case(world):
    """The same requests as tenant A answer what they hold: the 404s above are the tenant check's."""
    client, seeded, owner, _ = world
    ids = {"job_id": seeded.job_id, "artifact_id": seeded.artifact_id}

    def get(template: str, case: dict):
        return request(client, "GET", template, ids, case, owner)

    assert get("/jobs/{job_id}", {}).json()["stages"][0]["artifact_id"] == seeded.artifact_id
    assert get("/jobs/{job_id}/metrics", {}).json()[0]["records"][0]["loss"] == 0.7
    assert len(get("/jobs/{job_id}/events", {"params": {"after": 0, "limit": 5}}).json()["data"]) == 5
    assert get("/artifacts/{artifact_id}", {}).json()["job_id"] == seeded.job_id
    for path, sha256 in seeded.files.items():
        served = get("/artifacts/{artifact_id}/files/{path:path}", {"path": path})
        assert served.status_code == 200 and hashlib.sha256(served.content).hexdigest() == sha256
    assert get("/artifacts/{artifact_id}/files/{path:path}", {"path": "manifest.json"}).json()["files"]
    assert get("/artifacts/{artifact_id}/files/{path:path}", {"path": "nope.bin"}).status_code == 404
    # The seeded adapter is not a real one: the export finds the artifact and refuses to merge it (422).
    export = get("/artifacts/{artifact_id}/export", {})
    assert export.status_code == 422 and export.json()["detail"][0]["field"] == "artifact_id"
    cancelled = request(client, "POST", "/jobs/{job_id}/cancel", ids, {}, owner)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    # A cancelled job's stream sends every event, then ends; resumed from an id, only the later ones.
    stream = get("/jobs/{job_id}/events", {"headers": SSE})
    assert stream.status_code == 200 and stream.text.rstrip().endswith('data: {"status": "end"}')
    resumed = get("/jobs/{job_id}/events", {"headers": {**SSE, "Last-Event-ID": "1"}})
    sent = [int(line[4:]) for line in stream.text.splitlines() if line.startswith("id: ")]
    assert len(sent) >= 6 and [int(line[4:]) for line in resumed.text.splitlines() if line.startswith("id: ")] == [
        event_id for event_id in sent if event_id > 1]
