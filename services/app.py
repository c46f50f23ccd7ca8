"""The FastAPI application: routes, error bodies, and start-up (schema check, bootstrap key, dispatcher).

``create_app(settings)`` builds the app; ``uvicorn`` (through ``align serve``) runs it. ``align serve``
starts the service's own Ray (:mod:`services.local_ray`) and hands its client in; an app that runs the
dispatcher with neither a client nor ``ALIGN_RAY_ADDRESS`` starts one itself. Either way the app stops
that Ray when it shuts down.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.db import auth
from services.db.models import Tenant
from services.db.notify import EventWaker, listen_url
from services.db.session import (
    NotMigrated,
    check_migrated,
    database_unavailable,
    error_line,
    make_engine,
    make_sessionmaker,
)
from services.deps import FieldErrors
from services.metrics import RequestMetricsMiddleware, ServiceMetrics, route_template
from services.request_guard import RequestGuard
from services.routes import artifacts, health, reports
from services.routes import jobs as job_routes
from services.routes import metrics as metrics_routes
from services.schemas import ErrorBody, ErrorMessage
from services.settings import Settings, get_settings

logger = logging.getLogger(__name__)

DISPATCHER_STOP_SECONDS = 30.0
BOOTSTRAP_TENANT = "default"
DATABASE_RETRY_AFTER_SECONDS = 5
"""``Retry-After`` of a 503 answered while the database cannot be reached."""
DATABASE_LOG_SECONDS = 30.0
"""While the database stays unreachable, one warning per this many seconds, not one per request."""
UI_FOLDER = Path(__file__).with_name("ui")
# The dashboard's ES modules as RFC 9239 names them; Python 3.11 without /etc/mime.types says application/javascript.
mimetypes.add_type("text/javascript", ".js")
"""The dashboard's pages, scripts and vendored libraries, shipped as package data."""


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    ray_client: Any = None,
) -> FastAPI:
    """The API for ``settings`` (default: from ``ALIGN_*`` variables).

    ``session_factory`` replaces the one built from ``settings.database_url``; ``ray_client`` (a
    ``services.dispatcher.RayJobs``) the one built from ``settings.ray_address`` for the dispatcher.
    """
    settings = settings or get_settings()
    owns_engine = session_factory is None
    if session_factory is None:
        session_factory = make_sessionmaker(make_engine(settings.database_url))

    event_waker = EventWaker(listen_url(session_factory.kw["bind"]), settings.sse_poll_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop, thread, listener = threading.Event(), None, None
        try:
            try:
                check_migrated(session_factory.kw["bind"])
            except NotMigrated as error:
                raise RuntimeError(f"align API refuses to start: {error}") from None
            if settings.bootstrap_api_key:
                with session_factory.begin() as session:
                    _ensure_bootstrap_key(session, settings.bootstrap_api_key)
            if settings.run_dispatcher:
                thread = _start_dispatcher(app, settings, session_factory, stop)
            listener = asyncio.create_task(event_waker.run(), name="align-event-listener")
            yield
        finally:
            if listener is not None:
                listener.cancel()
                try:
                    await listener
                except asyncio.CancelledError:
                    pass
                except Exception:  # the rest of the shutdown must run: stop the dispatcher and Ray
                    logger.exception("the event listener had failed")
            stop.set()
            if thread is not None:
                thread.join(DISPATCHER_STOP_SECONDS)
            if getattr(app.state.ray_client, "local", None) is not None:
                # The service's own Ray ends with it. Here, not in `align serve` after uvicorn returns:
                # uvicorn re-raises SIGTERM once its shutdown is done, so nothing after it runs.
                app.state.ray_client.close()
            if owns_engine:
                session_factory.kw["bind"].dispose()

    # /docs and /redoc serve Swagger UI and ReDoc from the installed fastapi-offline package: no CDN.
    app = FastAPIOffline(
        title="align",
        summary=("Preference-alignment trainer: submit jobs that chain SFT, reward-model, DPO, PPO, GRPO and RLOO "
                 "stages, and follow them."),
        version="0.1.0",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from swagger.io
        # `/jobs/` is not `/jobs/{job_id}` with an empty id: 404, not a redirect to the job list.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.session_factory = session_factory
    app.state.ray_client = ray_client
    app.state.event_waker = event_waker
    app.state.metrics = ServiceMetrics(session_factory)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestGuard, max_request_bytes=settings.max_request_bytes)
    app.add_exception_handler(FieldErrors, _field_errors)
    app.add_exception_handler(RequestValidationError, _request_validation_errors)
    unavailable = _DatabaseUnavailable()
    for error_class in (DBAPIError, PoolTimeout, *_psycopg_errors()):
        app.add_exception_handler(error_class, unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_errors)
    routers = [module.router for module in (job_routes, artifacts, reports, health, metrics_routes)]
    for router in routers:
        app.include_router(router)
    # The dashboard: static pages that call the API above with the key the user pastes (docs/ui.md).
    app.mount("/ui", _Revalidated(directory=UI_FOLDER, html=True), name="ui")
    app.add_api_route("/ui", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    # Every route that takes methods, for the Allow header of a 405 (see _http_errors).
    app.state.method_routes = [route for router in [*routers, app.router] for route in router.routes
                               if getattr(route, "methods", None)]
    return app


class _Revalidated(StaticFiles):
    """Static files that browsers check again on each load (a 304 when unchanged). Without it a browser may
    keep modules of an older align for a while after an upgrade, next to newer ones that import them."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _start_dispatcher(app: FastAPI, settings: Settings, session_factory, stop: threading.Event) -> threading.Thread:
    from services.dispatcher import Dispatcher, RayJobs

    if app.state.ray_client is None:
        from services.local_ray import LocalRayError

        try:
            app.state.ray_client = RayJobs.connect(settings.ray_address)
        except LocalRayError as error:
            raise RuntimeError(f"align API refuses to start: {error}") from None
    dispatcher = Dispatcher(settings, session_factory, app.state.ray_client, metrics=app.state.metrics.dispatcher)
    thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), name="align-dispatcher", daemon=True)
    thread.start()
    logger.info("dispatcher %s started", dispatcher.owner_id)
    return thread


def _ensure_bootstrap_key(session: Session, plaintext: str) -> None:
    """Register the configured key for tenant ``default`` unless it is already registered."""
    if auth.tenant_for_key(session, plaintext) is not None:
        return
    tenant = session.scalars(select(Tenant).where(Tenant.name == BOOTSTRAP_TENANT)).first()
    if tenant is None:
        tenant = auth.create_tenant(session, BOOTSTRAP_TENANT)
    auth.create_api_key(session, tenant.id, "bootstrap", plaintext=plaintext)


def _psycopg_errors() -> tuple[type[Exception], ...]:
    """psycopg's own errors (raised outside SQLAlchemy); none where the driver is not installed."""
    try:
        import psycopg
    except ImportError:
        return ()
    return (psycopg.Error,)


class _DatabaseUnavailable:
    """Answers 503 with ``Retry-After`` when a route could not reach the database (a lost or refused connection,
    the server shutting down): the request may be sent again as it was. Any other database error is left
    to the server's 500. The warning is logged once per ``DATABASE_LOG_SECONDS`` while it lasts."""

    def __init__(self):
        self._logged_at = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, request: Request, error: Exception) -> JSONResponse:
        if not database_unavailable(error):
            raise error
        request.app.state.metrics.database_unavailable.labels(route_template(request.scope)).inc()
        with self._lock:
            now = time.monotonic()
            due = now - self._logged_at >= DATABASE_LOG_SECONDS
            if due:
                self._logged_at = now
        if due:
            logger.warning("database unavailable, answering 503 (%s %s): %s", request.method, request.url.path,
                           error_line(error))
        body = ErrorMessage(detail=f"the database is unavailable; try again in {DATABASE_RETRY_AFTER_SECONDS} s")
        return JSONResponse(body.model_dump(), status_code=503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})


def _field_errors(_request: Request, error: FieldErrors) -> JSONResponse:
    return _unprocessable(error.errors)


async def _http_errors(request: Request, error: StarletteHTTPException) -> Response:
    """FastAPI's answer, except that a 405's ``Allow`` lists the methods of every route on the path the
    request matched, not only those of the first such route (``GET /jobs`` and ``POST /jobs`` are two routes;
    ``/jobs/validate`` is its own path, though ``/jobs/{job_id}`` would match it too)."""
    routes = request.app.state.method_routes
    if error.status_code == 405:
        path = next((route.path for route in routes if route.matches(request.scope)[0] is not Match.NONE), None)
        allowed = {method for route in routes if route.path == path for method in route.methods}
        error.headers = {**(error.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, error)


def _request_validation_errors(_request: Request, error: RequestValidationError) -> JSONResponse:
    return _unprocessable([(_field_name(e["loc"]), _message(e)) for e in error.errors()])


def _unprocessable(errors: list[tuple[str, str]]) -> JSONResponse:
    body = ErrorBody(detail=[{"field": field, "message": message} for field, message in errors])
    return JSONResponse(body.model_dump(), status_code=422)


def _field_name(loc: tuple | list) -> str:
    """``("body", "stages", 1, "lr")`` -> ``stages[1].lr``; a query, path or header parameter by its name."""
    if len(loc) == 2 and loc[0] == "body" and isinstance(loc[1], int):
        return "(body)"  # a JSON syntax error: the number is a character position
    parts: list[str] = []
    for item in loc[1:]:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    if loc and loc[0] == "header" and parts:
        return parts[0].title()
    return "".join(parts) or f"({loc[0] if loc else 'request'})"


def _message(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", message)
        return f"the body is not valid JSON: {reason} at character {error['loc'][-1]}"
    value = error.get("input")
    if error["type"] != "missing" and isinstance(value, (str, int, float, bool)):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        return f"{message} (got {shown})"
    return message
