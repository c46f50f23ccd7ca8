"""Alembic migrations of the service's database, located by ``services.db.session`` (no alembic.ini).

A package of its own at the top level, shipped in the wheel, so ``align db upgrade`` works from an install.
"""
