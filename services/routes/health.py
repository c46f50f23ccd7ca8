"""Liveness (the process answers) and readiness (the database answers, and Ray accepts a job when configured)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.schemas import Health

router = APIRouter(tags=["health"])
NOT_READY = {503: {"model": Health, "description": "Not ready"}}

# Load balancers probe with GET or HEAD; a HEAD answer has the status and headers of the GET one, no body.


@router.head("/healthz", response_model=Health)
@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.head("/readyz", response_model=Health, responses=NOT_READY)
@router.get("/readyz", response_model=Health, responses=NOT_READY)
def readyz(request: Request) -> JSONResponse:
    """200 when every dependency answers, else 503 naming the one that does not and why."""
    checks = {"database": _check_database(request)}
    ray_client = getattr(request.app.state, "ray_client", None)
    if ray_client is not None:
        checks["ray"] = _check_ray(request, ray_client)
    ready = all(result == "ok" for result in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _check_database(request: Request) -> str:
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        return _reason("unreachable", error)
    return "ok"


def _check_ray(request: Request, ray_client) -> str:
    """"ok" when the Jobs API accepted a (no-op) submission in the last ``ready_probe_seconds``.

    A status query only needs the dashboard; a submission also needs the head node's job agent and
    raylet, so only a submission shows that the dispatcher can start stages.
    """
    last_ok = getattr(request.app.state, "ray_probe_ok_at", None)
    if last_ok is not None and time.monotonic() - last_ok < request.app.state.settings.ready_probe_seconds:
        return "ok"
    try:
        ray_client.check_submission()
    except (OSError, RuntimeError, ValueError) as error:  # connection errors, or the Jobs API's own RuntimeError
        request.app.state.ray_probe_ok_at = None
        return _reason("cannot accept a job", error)
    request.app.state.ray_probe_ok_at = time.monotonic()
    return "ok"


def _reason(what: str, error: Exception) -> str:
    """One line: Ray answers a failed submission with a whole traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{what}: {type(error).__name__}: {detail}"[:300]
