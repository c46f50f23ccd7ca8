"""``align tenants`` and ``align keys``: the operator's commands for tenants and their API keys.

They work on the database of the settings (``ALIGN_DATABASE_URL``, as ``align db upgrade``), not through the
HTTP API, and refuse a database that is missing or not migrated. A key's plaintext is printed once, by
``align keys create``; the database holds only its sha256, and no command shows either again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text
from sqlalchemy.orm import Session

from align.cli import app
from align.cli_output import console, fail, say

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants: each sees only its own jobs and artifacts.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")

MAX_NAME = 200


@contextmanager
def admin_session() -> Iterator[Session]:
    """A session on the settings' database, committed when the block ends; exits 2 with the fix when the
    database is missing, cannot be reached, or is not at the newest migration."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, OperationalError

    from services.db.session import NotMigrated, check_migrated, make_engine, make_sessionmaker, normalize_url
    from services.settings import Settings

    url = Settings().database_url
    try:
        parsed = make_url(normalize_url(url))
    except ArgumentError:
        raise fail(f"ALIGN_DATABASE_URL={url!r} is not a database URL: give sqlite:///path or "
                   "postgresql://user@host/db") from None
    file = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if file not in (None, "", ":memory:") and not Path(file).is_file():
        raise fail(f"no database at {file} (ALIGN_DATABASE_URL={url}): `align serve` creates the embedded one "
                   "in ./.align; `align db upgrade` creates and migrates the one ALIGN_DATABASE_URL names")
    engine = make_engine(url)
    try:
        try:
            check_migrated(engine)
        except NotMigrated as error:
            raise fail(str(error)) from None
        except OperationalError as error:
            shown = parsed.render_as_string(hide_password=True)
            raise fail(f"cannot reach the database at {shown} (ALIGN_DATABASE_URL): {error.orig}") from None
        with make_sessionmaker(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _checked_name(value: str, what: str) -> str:
    name = value.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise fail(f"{what} {value!r}: give 1 to {MAX_NAME} printable characters")
    return name


def _tenant(session: Session, name: str):
    from services.db import auth

    tenant = auth.tenant_named(session, name)
    if tenant is None:
        raise fail(f"no tenant {name!r}; `align tenants list` shows them, `align tenants create NAME` adds one", 1)
    return tenant


@tenants_app.command("create")
def tenants_create(name: str = typer.Argument(..., help="The tenant's name, unique.")) -> None:
    """Create a tenant; give it a key with `align keys create --tenant NAME`."""
    from services.db import auth

    name = _checked_name(name, "tenant name")
    from sqlalchemy.exc import IntegrityError

    def exists() -> typer.Exit:
        return fail(f"tenant {name!r} exists already; `align keys create --tenant {name}` gives it a key", 1)

    try:
        with admin_session() as session:
            if auth.tenant_named(session, name) is not None:
                raise exists()
            tenant = auth.create_tenant(session, name)
    except IntegrityError:  # made by another command between the look-up and the insert
        raise exists() from None
    say(f"created tenant {tenant.name!r} ({tenant.id}); give it a key with `align keys create --tenant {name}`")


@tenants_app.command("list")
def tenants_list() -> None:
    """The tenants, with how many live (not revoked) keys each has."""
    from services.db import auth

    with admin_session() as session:
        tenants = auth.list_tenants(session)
        live: dict[str, int] = {}
        for key, tenant in auth.list_api_keys(session):
            live[tenant.id] = live.get(tenant.id, 0) + (key.revoked_at is None)
    table = Table()
    for column in ("name", "id", "created", "live keys", "quotas"):
        table.add_column(column, overflow="fold")
    for tenant in tenants:
        table.add_row(Text(tenant.name), tenant.id, _when(tenant.created_at), str(live.get(tenant.id, 0)),
                      _quotas(tenant))
    console.print(table)


def _quotas(tenant) -> str:
    parts = [f"{tenant.max_running_stages} running stages" if tenant.max_running_stages is not None else "",
             f"{tenant.max_gpus:g} GPUs" if tenant.max_gpus is not None else "",
             f"{tenant.max_artifact_bytes / 2**30:g} GiB of artifacts" if tenant.max_artifact_bytes is not None else ""]
    return ", ".join(part for part in parts if part) or "none"


@tenants_app.command("quota")
def tenants_quota(
    name: str = typer.Argument(..., help="The tenant's name."),
    running_stages: int | None = typer.Option(None, "--running-stages", min=0,
                                              help="Most of its stages running at once."),
    gpus: float | None = typer.Option(None, "--gpus", min=0, help="Most GPUs its running stages hold at once."),
    artifact_gib: float | None = typer.Option(None, "--artifact-gib", min=0,
                                              help="Most GiB its artifacts may take in the store."),
    clear: bool = typer.Option(False, "--clear", help="Remove every quota (no limits)."),
) -> None:
    """Set a tenant's quotas; the ones not given stay as they are. A stage over a quota waits in `queued`
    with the reason; a job with a stage that asks for more GPUs than --gpus is refused."""
    with admin_session() as session:
        tenant = _tenant(session, name)
        if clear:
            tenant.max_running_stages = tenant.max_gpus = tenant.max_artifact_bytes = None
        if running_stages is not None:
            tenant.max_running_stages = running_stages
        if gpus is not None:
            tenant.max_gpus = gpus
        if artifact_gib is not None:
            tenant.max_artifact_bytes = int(artifact_gib * 2**30)
        shown = _quotas(tenant)
    say(f"tenant {name!r} quotas: {shown}")


@keys_app.command("create")
def keys_create(
    tenant: str = typer.Option(..., "--tenant", help="The tenant the key acts as."),
    name: str = typer.Option("cli", "--name", help="A label to tell keys apart in `align keys list`."),
) -> None:
    """Create an API key and print it once, alone on standard output; only its sha256 is stored."""
    from services.db import auth

    label = _checked_name(name, "key name")
    with admin_session() as session:
        key, plaintext = auth.create_api_key(session, _tenant(session, tenant).id, label)
    typer.echo(f"created key {key.id} ({label!r}) for tenant {tenant!r}. It is shown this once: clients send it "
               "as 'Authorization: Bearer <key>' (the align CLI reads ALIGN_API_KEY)", err=True)
    typer.echo(plaintext)


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, "--tenant", help="Only this tenant's keys.")) -> None:
    """Key ids, labels, tenants and when each was created and revoked; never a key or its hash."""
    from services.db import auth

    with admin_session() as session:
        tenant_id = _tenant(session, tenant).id if tenant is not None else None
        rows = auth.list_api_keys(session, tenant_id)
    table = Table()
    for column in ("id", "tenant", "name", "created", "revoked"):
        table.add_column(column, overflow="fold")
    for key, owner in rows:
        table.add_row(key.id, Text(owner.name), Text(key.name), _when(key.created_at), _when(key.revoked_at))
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key's id, as `align keys list` shows it.")) -> None:
    """Revoke a key: its next request, and every one after, gets 401."""
    from services.db import auth
    from services.db.models import Tenant

    with admin_session() as session:
        revoked = auth.revoke_api_key(session, key_id)
        if revoked is None:
            raise fail(f"no key {key_id!r}; `align keys list` shows the key ids", 1)
        key, now = revoked
        owner = session.get(Tenant, key.tenant_id).name
    if now:
        say(f"revoked key {key.id} ({key.name!r}) of tenant {owner!r}; requests with it get 401 from now on")
    else:
        say(f"key {key.id} ({key.name!r}) was revoked already, at {_when(key.revoked_at)}")
