"""The ``align`` command: the training and client commands of :mod:`align.cli` plus the service's own.

``align serve`` runs the API (and by default the dispatcher); ``align dispatcher`` runs a dispatcher
alone; ``align db upgrade`` migrates the database. They live here because the training library
never imports service code.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from pathlib import Path

import typer

from align.cli import app
from align.cli_output import console, fail

db_app = typer.Typer(no_args_is_help=True, help="Database schema migrations.")
app.add_typer(db_app, name="db")


def _settings(**overrides):
    """The service's settings; settings that do not validate (overlapping roots, a bad value in an
    ``ALIGN_*`` variable) end the command with one line each, naming the setting."""
    from pydantic import ValidationError

    from services.settings import Settings

    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**values)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            name = ".".join(str(part) for part in problem["loc"])
            where = f"{name} (ALIGN_{name.upper()}): " if name else ""
            lines.append(where + problem["msg"].removeprefix("Value error, "))
        raise fail("\n".join(lines)) from None


def _embedded_sqlite(url: str) -> Path | None:
    """The file of a SQLite database under the local state folder (the embedded default), else None."""
    from align.paths import home_dir

    if not url.startswith("sqlite:///"):
        return None
    path = Path(url.removeprefix("sqlite:///")).absolute()
    return path if home_dir() in path.parents else None


def prepare_database(url: str) -> None:
    """Refuse an un-migrated database, except the embedded SQLite file, which is migrated in place."""
    from services.db.session import NotMigrated, check_migrated, make_engine, upgrade

    embedded = _embedded_sqlite(url)
    if embedded is not None:
        embedded.parent.mkdir(parents=True, exist_ok=True)
        upgrade(url)
        return
    engine = make_engine(url)
    try:
        check_migrated(engine)
    except NotMigrated as error:
        raise fail(str(error)) from None
    finally:
        engine.dispose()


def ensure_local_api_key(settings) -> list[Path]:
    """With no key configured and none in the database, create tenant `default` and write its key where the
    client looks: the state folder (``$ALIGN_HOME`` or ``./.align``) and the user's config folder
    (``~/.config/align``), so the CLI finds it from any folder. Returns the files written."""
    from sqlalchemy import func, select

    from align.paths import config_dir, home_dir
    from services.db import auth
    from services.db.models import ApiKey
    from services.db.session import make_engine, make_sessionmaker

    if settings.bootstrap_api_key:
        return []
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            if session.scalar(select(func.count()).select_from(ApiKey)):
                return []
            tenant = auth.create_tenant(session, "default")
            _, plaintext = auth.create_api_key(session, tenant.id, "local", plaintext="al-" + secrets.token_urlsafe(24))
    finally:
        engine.dispose()
    written = [home_dir() / "api_key", config_dir() / "api_key"]
    for key_file in written:
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.chmod(0o600)
        key_file.write_text(plaintext + "\n")
    console.print(f"created API key for tenant 'default' in {' and '.join(map(str, written))} (the CLI reads it "
                  "from there; ALIGN_API_KEY overrides both)", markup=False, soft_wrap=True)
    return written


def start_local_ray(num_cpus: int | None):
    """A Ray of this service's own (services.local_ray); returns the Jobs API client of its dashboard."""
    from services.dispatcher import RayJobs
    from services.local_ray import LocalRayError

    try:
        client = RayJobs.start_local(num_cpus)
    except LocalRayError as error:
        raise fail(str(error)) from None
    console.print(f"started a local Ray ({num_cpus or 'all'} CPUs), jobs API at {client.address}, "
                  f"GCS at {client.cluster_address}")
    return client


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Listen address (ALIGN_HOST, default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (ALIGN_PORT, default 8321)."),
    dispatcher: bool = typer.Option(True, help="Run the dispatcher in this process."),
    ray_cpus: int | None = typer.Option(
        None, help="CPUs of the local Ray (default: all); ignored with ALIGN_RAY_ADDRESS."),
) -> None:
    """Run the job service: HTTP API and dispatcher, on embedded defaults unless ALIGN_* settings say otherwise."""
    import uvicorn

    from services.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings(host=host, port=port, run_dispatcher=dispatcher)
    prepare_database(settings.database_url)
    ensure_local_api_key(settings)
    ray_client = None
    if dispatcher and not settings.ray_address:
        ray_client = start_local_ray(ray_cpus)
    try:
        app = create_app(settings, ray_client=ray_client)
        console.print(f"align service on http://{settings.host}:{settings.port} (database {settings.database_url})")
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        # The app's shutdown stops this Ray once its lifespan started; this covers a failure before
        # that (create_app, uvicorn's config). Stopping twice does nothing the second time.
        if ray_client is not None:
            ray_client.close()


def start_metrics_server(settings, metrics):
    """Serve ``metrics`` (a :class:`services.metrics.ServiceMetrics`) at ``/metrics`` on ``ALIGN_METRICS_PORT``
    from a daemon thread; returns the server, or None when no port is set."""
    from prometheus_client import start_http_server

    if not settings.metrics_port:
        return None
    server, _thread = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry)
    return server


@app.command("dispatcher")
def run_dispatcher() -> None:
    """Run a dispatcher alone (several may run against one database); needs ALIGN_RAY_ADDRESS. With
    ALIGN_METRICS_PORT it serves its Prometheus metrics there. SIGTERM drains it: it claims nothing more,
    submits what it had claimed, and exits, leaving its running attempts training for the other dispatchers."""
    from services.db.session import make_engine, make_sessionmaker
    from services.dispatcher import Dispatcher, RayJobs
    from services.metrics import ServiceMetrics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings()
    if not settings.ray_address:
        console.print("[red]ALIGN_RAY_ADDRESS: set it to the Ray cluster's jobs API, e.g. http://head:8265[/red]")
        raise typer.Exit(2)
    if not os.environ.get("ALIGN_REPORT_SECRET"):
        console.print("[red]ALIGN_REPORT_SECRET: set the same secret here and on the API servers; the API checks "
                      "the report tokens this dispatcher hands to workers[/red]")
        raise typer.Exit(2)
    prepare_database(settings.database_url)
    stop = threading.Event()
    metrics = ServiceMetrics()
    worker = Dispatcher(settings, make_sessionmaker(make_engine(settings.database_url)), RayJobs(settings.ray_address),
                        metrics=metrics.dispatcher)

    def drain_on_sigterm(*_) -> None:  # the tick under way claims nothing more; run_forever returns after it
        worker.draining = True
        stop.set()

    signal.signal(signal.SIGTERM, drain_on_sigterm)
    console.print(f"dispatcher {worker.owner_id} on {settings.ray_address}")
    if start_metrics_server(settings, metrics) is not None:
        console.print(f"metrics on http://{settings.metrics_host}:{settings.metrics_port}/metrics")
    try:
        worker.run_forever(stop)
    except KeyboardInterrupt:
        stop.set()
    left = worker.drain()
    console.print(f"dispatcher {worker.owner_id} stopped; {left} running attempts left to the other dispatchers")


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Migrate the database (ALIGN_DATABASE_URL) up to ``revision``."""
    from services.db.session import upgrade

    settings = _settings()
    embedded = _embedded_sqlite(settings.database_url)
    if embedded is not None:
        embedded.parent.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url, revision)
    console.print(f"database at {revision}: {settings.database_url}")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base.")) -> None:
    """Migrate the database down to ``revision``."""
    from services.db.session import downgrade

    settings = _settings()
    downgrade(settings.database_url, revision)
    console.print(f"database at {revision}: {settings.database_url}")


# `align tenants ...` and `align keys ...` register themselves on the same app.
from services import cli_admin  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
