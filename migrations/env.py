"""Alembic environment: the URL comes from the Config built by ``services.db.session.alembic_config``."""

from __future__ import annotations

from alembic import context
from sqlalchemy.pool import NullPool

from services.db.models import Base
from services.db.session import make_engine

config = context.config


def run_migrations_online() -> None:
    engine = make_engine(config.attributes["database_url"], poolclass=NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `align db upgrade` on a database")
run_migrations_online()
