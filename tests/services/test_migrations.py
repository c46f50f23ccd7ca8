"""Migrations up to head, down to base and up again on SQLite and Postgres; the schema matches the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from services.db.models import Base
from services.db.session import (
    MIGRATIONS_DIR,
    NotMigrated,
    check_migrated,
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    upgrade,
)

TABLES = {"tenants", "api_keys", "jobs", "stage_runs", "artifacts", "events"}


def tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade(empty_database_url):
    engine = make_engine(empty_database_url)
    try:
        with pytest.raises(NotMigrated, match="run `align db upgrade`"):
            check_migrated(engine)
        upgrade(empty_database_url)
        assert tables(engine) == TABLES
        assert current_revision(engine) == head_revision() == "0004_tenant_quotas"
        check_migrated(engine)
        downgrade(empty_database_url, "base")
        assert tables(engine) == set() and current_revision(engine) is None
        with pytest.raises(NotMigrated, match="empty database"):
            check_migrated(engine)
        upgrade(empty_database_url)
        assert tables(engine) == TABLES
        check_migrated(engine)
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(database_url):
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        engine.dispose()


def test_migrations_are_the_top_level_package():
    import migrations

    assert Path(migrations.__file__).resolve().parent == MIGRATIONS_DIR
    assert MIGRATIONS_DIR.parent == Path(__file__).resolve().parents[2]
    assert (MIGRATIONS_DIR / "env.py").is_file() and (
        MIGRATIONS_DIR / "versions" / "0001_initial.py"
    ).is_file()
