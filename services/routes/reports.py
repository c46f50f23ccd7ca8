"""The worker report endpoint: heartbeats, metrics, checkpoints, samples, artifacts and failures of an attempt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, status

from align.json_values import finite_json
from services.db import reports
from services.deps import FieldErrors, SessionDep, SettingsDep, bearer_token
from services.schemas import Ok, ReportIn, payload_problems

# Workers call it with a per-attempt token from their ticket; it is not part of the public API.
router = APIRouter(prefix="/internal", tags=["internal"], include_in_schema=False)


@router.post(
    "/reports",
    response_model=Ok,
    responses={401: {"description": "Missing, bad or expired report token"},
               409: {"description": "Stale attempt or stage not running"}},
)
def post_report(
    report: ReportIn,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
) -> Ok:
    """Apply a report if it comes from the stage run's current, running attempt; 409 tells the worker to stop."""
    token = bearer_token(authorization)
    refused = "missing report token" if token is None else settings.check_report_token(
        report.stage_run_id, report.attempt, token)
    if refused:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, refused)
    problems = payload_problems(report)
    if problems:
        raise FieldErrors(problems)
    # NaN and Infinity (a diverged loss) are kept as the strings "NaN", "Infinity" and "-Infinity".
    payload = finite_json(report.payload)
    if not reports.apply_report(
        session, report.stage_run_id, report.attempt, report.type, payload, lease_seconds=settings.lease_seconds
    ):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"attempt {report.attempt} of {report.stage_run_id} is stale or no longer running; stop training",
        )
    return Ok()
