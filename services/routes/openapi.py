"""What the OpenAPI document says about every route: the API-key scheme and the error answers.

Every status code a route can answer is declared here once and applied to the routers in
``services/routes/*.py``; tests/reliability/test_schemathesis.py checks the document against live answers.
"""

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

Responses = dict[int | str, dict[str, Any]]

UNAUTHORIZED: Responses = {
    401: {"model": ErrorMessage, "description": "Missing, invalid or revoked API key",
          "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}},
}
INVALID: Responses = {
    422: {"model": ErrorBody, "description": "Invalid input; each entry names its field and what would be accepted"},
}
NOT_FOUND: Responses = {
    404: {"model": ErrorMessage, "description": "No such resource for this tenant"},
}
TOO_LARGE: Responses = {
    413: {"model": ErrorMessage, "description": "The request body is over the size the API reads "
                                                "(`ALIGN_MAX_REQUEST_BYTES`)"},
}
UNAVAILABLE: Responses = {
    503: {"model": ErrorMessage, "description": "The database does not answer; try again after `Retry-After` seconds",
          "headers": {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}},
}

KEY_IN_QUERY: Responses = {
    400: {"model": ErrorMessage, "description": "An API key in the query string; send it in the `Authorization` "
                                                "header"},
}

PROTECTED: Responses = {**KEY_IN_QUERY, **UNAUTHORIZED, **INVALID, **UNAVAILABLE}
"""Every route behind an API key: credentials in the query string are refused (400), the key is checked (401),
input is checked (422), and the database is read (503 while it is down)."""
UNREADABLE_BODY: Responses = {
    400: {"model": ErrorMessage, "description": "The body could not be read as text (not UTF-8), or an API key "
                                                "in the query string"},
}
WITH_BODY: Responses = {**UNREADABLE_BODY, **TOO_LARGE}
"""Routes that read a request body; the size limit applies before the route runs."""
