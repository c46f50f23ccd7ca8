"""Engines, sessions and schema migrations (Alembic, configured here rather than in an alembic.ini)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
"""The top-level ``migrations`` package (Alembic's script location), shipped in the wheel beside ``services``."""


class NotMigrated(RuntimeError):
    """The database schema is missing or older than this code."""


def normalize_url(url: str) -> str:
    """``postgresql://`` (and ``postgres://``) URLs go through psycopg 3."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def database_unavailable(error: BaseException) -> bool:
    """True when ``error``, or an error it was raised from, says the database cannot be reached now.

    That is a failed or lost connection, a pool with no connection to give, or an operational error (the
    server shutting down, SQLite's lock not taken in time): SQLAlchemy's ``OperationalError``,
    ``InterfaceError``, pool ``TimeoutError``, any ``DBAPIError`` that invalidated its connection, and
    psycopg's own ``OperationalError`` and ``InterfaceError`` (the LISTEN connection uses psycopg directly).
    A bad statement or bad data (``ProgrammingError``, ``DataError``, ``IntegrityError``) is not.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
            return True
        if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
            return True
        if type(error).__module__.startswith("psycopg") and isinstance(error, _psycopg_unavailable()):
            return True
        error = error.__cause__ or error.__context__
    return False


def error_line(error: BaseException) -> str:
    """A database error in one line for a log: the driver's message without SQLAlchemy's statement and link."""
    text = " ".join(str(getattr(error, "orig", None) or error).split())
    return f"{type(error).__name__}: {text}"[:300]


def _psycopg_unavailable() -> tuple[type[BaseException], ...]:
    import psycopg

    return (psycopg.OperationalError, psycopg.InterfaceError)


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for ``url``. Postgres gets read committed transactions; SQLite WAL, a busy timeout, foreign keys
    and write-locking transactions."""
    url = normalize_url(url)
    if not url.startswith("sqlite"):
        # Read committed whatever the server's default_transaction_isolation: the guarded updates and the
        # idempotent insert read rows other transactions committed after theirs began; under repeatable read
        # or serializable a race between them would end in a serialization error (a 500) instead.
        kwargs.setdefault("isolation_level", "READ COMMITTED")
        return create_engine(url, pool_pre_ping=True, **kwargs)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's own transaction handling breaks SAVEPOINT).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        # IMMEDIATE takes the write lock up front: concurrent read-then-write transactions wait on the
        # busy timeout instead of failing with SQLITE_BUSY when their snapshot goes stale.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = normalize_url(url)
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_migrated(engine: Engine) -> None:
    """Raise :class:`NotMigrated` unless the database is at the newest migration."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        found = "an empty database" if current is None else f"revision {current}"
        raise NotMigrated(
            f"the database at {engine.url.render_as_string(hide_password=True)} is at {found}, "
            f"this code needs revision {head}: run `align db upgrade`"
        )


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
