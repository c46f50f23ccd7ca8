"""Artifacts carry the evaluation gate their stage decided (metric, value, baseline, passed, reason).

Revision ID: 0003_artifact_gate
Revises: 0002_stage_phase
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_artifact_gate"
down_revision = "0002_stage_phase"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("gate", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("gate")
