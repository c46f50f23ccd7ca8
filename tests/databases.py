"""Test databases on the local Postgres server: created with a random name, dropped afterwards."""

from __future__ import annotations

import os

import pytest

POSTGRES_ADMIN_URL = os.environ.get("ALIGN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _postgres_admin():
    from sqlalchemy import create_engine

    from services.db.session import normalize_url

    return create_engine(normalize_url(POSTGRES_ADMIN_URL), isolation_level="AUTOCOMMIT")


def create_postgres_database(prefix: str = "align_test") -> str:
    """A new empty database on the test server; skips the test when the server cannot be reached."""
    import secrets

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    name = f"{prefix}_{secrets.token_hex(6)}"
    engine = _postgres_admin()
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        pytest.skip(f"no Postgres at {POSTGRES_ADMIN_URL}: {error.orig}")
    finally:
        engine.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def drop_postgres_database(url: str) -> None:
    from sqlalchemy import text

    engine = _postgres_admin()
    with engine.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
    engine.dispose()
