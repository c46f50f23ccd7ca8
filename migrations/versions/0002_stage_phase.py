"""Stage runs say which phase a running attempt is in (starting, waiting for resources, training, ...).

Revision ID: 0002_stage_phase
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.db.models import UTCDateTime

revision = "0002_stage_phase"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch:
        batch.add_column(sa.Column("phase", sa.String(40), nullable=True))
        batch.add_column(sa.Column("phase_since", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch:
        batch.drop_column("phase_since")
        batch.drop_column("phase")
