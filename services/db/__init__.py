"""The control plane's database: models, sessions and migrations, and the functions that change state."""

from services.db.session import (
    NotMigrated,
    check_migrated,
    downgrade,
    make_engine,
    make_sessionmaker,
    upgrade,
)

__all__ = ["NotMigrated", "check_migrated", "downgrade", "make_engine", "make_sessionmaker", "upgrade"]
