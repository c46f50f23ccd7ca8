"""The live OpenAPI document against the live API on Postgres: schemathesis generates requests for every
operation (schema-valid and schema-invalid ones), sends them to a real uvicorn with a tenant's key, and checks
every answer: never a 5xx, and every status code, content type, header and body as the document says.

Besides the generated cases, every path is sent the methods it does not declare (405 whose ``Allow`` lists
the declared ones), every query parameter an empty value, and every path parameter an empty segment.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter

import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

from services.app import create_app
from services.db import auth, reports, transitions
from services.settings import Settings

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)

EXAMPLES = {GenerationMode.POSITIVE: 36, GenerationMode.NEGATIVE: 26}
"""Per operation and mode; operations with path parameters get as many again with the ids of real rows."""
MIN_CASES = 1000
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
SPEC_CHECKED_BEYOND_SCHEMA = {("POST", "/jobs"), ("POST", "/jobs/validate")}
"""A schema-valid spec may still be refused (422): its files must exist under the allowed roots and its
stages fit together (a reward model before `reward: model`), which JSON Schema cannot say. The check that a
schema-valid request is accepted is skipped for these two; every other check applies."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def live_api(tmp_path, database_url, session_factory):
    """A uvicorn on a free port serving the API on ``database_url``; yields (base URL, auth headers, ids)."""
    data, models = tmp_path / "data", tmp_path / "models"
    data.mkdir()
    models.mkdir()
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    (data / "sft.jsonl").write_text((json.dumps(sft) + "\n") * 4)
    app_settings = Settings(
        database_url=database_url, artifact_root=str(tmp_path / "artifacts"), work_root=str(tmp_path / "work"),
        data_roots=[str(data)], model_roots=[str(models)], report_secret="schemathesis", run_dispatcher=False,
        sse_poll_seconds=0.05,
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(app_settings, session_factory=session_factory),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        with session_factory() as session:
            tenant = auth.create_tenant(session, "fuzz")
            _, key = auth.create_api_key(session, tenant.id, "schemathesis")
            session.commit()
        base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
        ids = _real_rows(base, headers, data, session_factory)
        yield base, headers, ids
    finally:
        server.should_exit = True
        thread.join(10)


def _real_rows(base: str, headers: dict, data, session_factory) -> dict[str, str]:
    """A job whose first stage published an artifact, then cancelled: the generated cases that use its ids
    reach the routes' answers past the 404, and its event stream ends (the job is terminal)."""
    spec = {"name": "fuzz", "base_model": "builtin:tiny",
            "stages": [{"type": "sft", "data": {"path": str(data / "sft.jsonl")}, "max_steps": 1}]}
    created = requests.post(f"{base}/jobs", json=spec, headers=headers, timeout=120)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    with session_factory.begin() as session:
        run = transitions.claim_next(session, "schemathesis", 300)
        artifact = {"artifact_id": "art_fuzz", "uri": "file:///nonexistent/fuzz/v1", "lineage": "fuzz.sft",
                    "version": 1, "kind": "adapter", "manifest_hash": "0" * 64}
        assert reports.apply_report(session, run.id, run.attempt, "artifact", artifact, lease_seconds=300)
        assert reports.apply_report(session, run.id, run.attempt, "metrics", {"step": 1, "loss": 1.5},
                                    lease_seconds=300)
    assert requests.post(f"{base}/jobs/{job_id}/cancel", headers=headers, timeout=30).status_code == 200
    return {"job_id": job_id, "artifact_id": "art_fuzz", "path": "manifest.json"}


def test_generated_requests_conform_to_the_document(live_api):
    base, headers, ids = live_api
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: Counter[int] = Counter()
    failures: dict[str, str] = {}
    timings: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    started = time.monotonic()
    for operation in operations:
        where = (operation.method.upper(), operation.path)
        excluded = [positive_data_acceptance] if where in SPEC_CHECKED_BEYOND_SCHEMA else []
        names = {parameter.name for parameter in operation.path_parameters}
        fixed_paths = [None] + ([{name: ids[name] for name in names}] if names else [])
        for mode, examples in EXAMPLES.items():
            for fixed in fixed_paths:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed)
                begun, before = time.monotonic(), sum(statuses.values())
                try:
                    _run(strategy, examples, base, headers, excluded, statuses, failures)
                except Unsatisfiable:
                    continue  # negative cases with every path parameter fixed and nothing else to make invalid
                finally:
                    timings.append(f"{where[0]} {where[1]} {mode.value}{' (real ids)' if fixed else ''}: "
                                   f"{sum(statuses.values()) - before} in {time.monotonic() - begun:.1f} s")
    elapsed = time.monotonic() - started
    cases = sum(statuses.values())
    print(f"\nschemathesis: {cases} cases over {len(operations)} operations in {elapsed:.1f} s; "
          f"statuses {dict(sorted(statuses.items()))}\n  " + "\n  ".join(timings))
    assert not [status for status in statuses if status >= 500], statuses
    assert not failures, f"{len(failures)} failures:\n" + "\n\n".join(failures.values())
    assert cases >= MIN_CASES, cases
    assert len(operations) >= 14


def _run(strategy, examples, base, headers, excluded, statuses, failures) -> None:
    # No shrinking and no example database: each failure is recorded as found and the run stays bounded.
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def one(case) -> None:
        response = case.call(base_url=base, headers=headers, timeout=30)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, excluded_checks=excluded, headers=headers,
                                   transport_kwargs={"base_url": base, "headers": headers, "timeout": 30})
        except (Failure, FailureGroup) as error:
            for failure in error.exceptions if isinstance(error, FailureGroup) else [error]:
                key = f"{case.method} {case.operation.path}: {failure.title}"
                failures.setdefault(key, f"{key}\n{failure.message}\n{case.as_curl_command(headers)}")

    one()


def test_edges_the_generator_may_miss(live_api):
    """Methods a path does not declare, empty query values and empty path segments: each a documented 4xx."""
    base, headers, ids = live_api
    document = requests.get(f"{base}/openapi.json", timeout=30).json()
    for path, operations in document["paths"].items():
        declared = {method.upper() for method in operations}
        url = base + path.format(**ids)
        for method in set(METHODS) - declared - _served_elsewhere(document, path, path.format(**ids)):
            response = requests.request(method, url, headers=headers, timeout=30)
            assert response.status_code == 405, (method, path, response.status_code)
            assert set(response.headers["allow"].replace(" ", "").split(",")) == declared, (method, path)
        for method, operation in operations.items():
            documented = set(operation["responses"])
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "query":
                    response = requests.request(method, url, params={parameter["name"]: ""}, headers=headers,
                                                timeout=30)
                    assert response.status_code < 500 and str(response.status_code) in documented, (
                        method, path, parameter["name"], response.status_code, response.text)
                elif parameter["in"] == "path":
                    empty = base + path.format(**{**ids, parameter["name"]: ""})
                    response = requests.request(method, empty, headers=headers, timeout=30,
                                                allow_redirects=False)
                    assert 400 <= response.status_code < 500 and str(response.status_code) in documented, (
                        method, path, parameter["name"], response.status_code, response.text)


def _served_elsewhere(document: dict, template: str, path: str) -> set[str]:
    """Methods another documented path serves at ``path`` (``GET /jobs/{job_id}`` at ``/jobs/validate``)."""
    methods = set()
    for other, operations in document["paths"].items():
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(other))
        if other != template and re.fullmatch(pattern, path):
            methods |= {method.upper() for method in operations}
    return methods


def test_head_probes(live_api):
    base, _, _ = live_api
    for path in ("/healthz", "/readyz"):
        response = requests.head(base + path, timeout=30)
        assert response.status_code == 200 and response.content == b"", path
        assert response.headers["content-type"] == "application/json", path
