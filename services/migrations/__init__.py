"""Alembic migrations, located by services.db.session (no alembic.ini)."""
