"""Tenant quotas (running stages, GPUs, artifact storage), why a queued stage waits, artifact sizes.

Revision ID: 0004_tenant_quotas
Revises: 0003_artifact_gate
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_tenant_quotas"
down_revision = "0003_artifact_gate"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("max_running_stages", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("max_gpus", sa.Double(), nullable=True))
        batch.add_column(sa.Column("max_artifact_bytes", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("stage_runs") as batch:
        batch.add_column(sa.Column("queued_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("size_bytes")
    with op.batch_alter_table("stage_runs") as batch:
        batch.drop_column("queued_reason")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("max_artifact_bytes")
        batch.drop_column("max_gpus")
        batch.drop_column("max_running_stages")
