"""What the OpenAPI document says about every protected route: the API-key scheme and the error answers."""

from __future__ import annotations

from typing import Any

from fastapi.security import HTTPBearer

from services.schemas import ErrorBody, ErrorMessage

API_KEY = HTTPBearer(
    scheme_name="ApiKey",
    description="An API key of your tenant: `Authorization: Bearer <key>`.",
    auto_error=False,  # services.deps.current_tenant answers a missing or bad key with its own 401
)
"""Declared on the protected routers so the document carries the scheme; checking the key is the deps' job."""

PROTECTED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing, invalid or revoked API key"},
    422: {"model": ErrorBody, "description": "Invalid input; each entry names its field and what would be accepted"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorMessage, "description": "No such resource for this tenant"},
}
