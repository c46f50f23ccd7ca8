"""Liveness (the process answers) and readiness (the database, and Ray when configured, answer)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request) -> JSONResponse:
    """200 when every dependency answers, else 503 naming the one that does not."""
    checks = {"database": _check_database(request)}
    ray_client = getattr(request.app.state, "ray_client", None)
    if ray_client is not None:
        checks["ray"] = _check_ray(ray_client)
    ready = all(result == "ok" for result in checks.values())
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


def _check_database(request: Request) -> str:
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        return f"unreachable: {type(error).__name__}: {error}"[:300]
    return "ok"


def _check_ray(ray_client) -> str:
    try:
        # Any Jobs API call needs the head; an unknown submission id answers None when it is up.
        ray_client.get_job_status("align-readiness-probe")
    except (OSError, RuntimeError) as error:  # connection errors, or the Jobs API's own RuntimeError
        return f"unreachable: {type(error).__name__}: {error}"[:300]
    return "ok"
