"""Refusals made before a request reaches its route: bodies over the size limit (413), NUL characters in
the path (404) or the query string (422), which no database column can hold, and API keys in the query
string (400), which proxies, server logs and browser history keep."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CREDENTIAL_PARAMETERS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "auth",
                                   "authorization", "bearer"})
"""Query parameter names (compared lower-cased) that carry a credential; no route takes one."""


class RequestGuard:
    """ASGI middleware. A body whose ``Content-Length`` is over the limit is refused before it is read; one
    sent without it (chunked) is counted as it arrives and refused once it passes the limit."""

    def __init__(self, app: ASGIApp, max_request_bytes: int) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                status, body = refusal
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            receive = self._counted(receive)
        await self.app(scope, receive, send)

    def _counted(self, receive: Receive) -> Receive:
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    # Raised inside the route's body read: FastAPI's exception handling answers it.
                    raise HTTPException(413, f"the request body is over the {self.max_request_bytes} bytes the "
                                             "API reads (ALIGN_MAX_REQUEST_BYTES)")
            return message

        return counted_receive

    def _refusal(self, scope: Scope) -> tuple[int, bytes] | None:
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_request_bytes:
            message = (f"the request body is {int(declared)} bytes, over the {self.max_request_bytes} bytes the "
                       "API reads (ALIGN_MAX_REQUEST_BYTES)")
            return 413, json.dumps({"detail": message}).encode()
        if "\x00" in scope["path"]:
            return 404, json.dumps({"detail": "no such resource: the path holds a NUL character (%00)"}).encode()
        query = scope["query_string"].decode("latin-1")
        pairs = parse_qsl(query, keep_blank_values=True)
        credentials = [name for name, _ in pairs if name.lower() in CREDENTIAL_PARAMETERS]
        if credentials:
            message = (f"the query parameter {credentials[0]!r} looks like an API key: keys in URLs end up in logs "
                       "and browser history, so the API refuses them. Remove it and send the key in the header "
                       "'Authorization: Bearer <key>' (and revoke the key if the URL was shared: `align keys revoke`)")
            return 400, json.dumps({"detail": message}).encode()
        fields = [name for name, value in pairs if "\x00" in name + value]
        if fields:
            detail = [{"field": name if "\x00" not in name else "(query)",
                       "message": "holds a NUL character (%00); remove it"} for name in fields]
            return 422, json.dumps({"detail": detail}).encode()
        return None
