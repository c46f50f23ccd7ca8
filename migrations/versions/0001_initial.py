"""Initial schema: tenants, API keys, jobs, stage runs, artifacts, events.

Revision ID: 0001_initial
Revises:
Create Date: 2025-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.db.models import UTCDateTime

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, UTCDateTime(), nullable=nullable)


def _tenant_id() -> sa.Column:
    tenant = sa.ForeignKey("tenants.id", ondelete="CASCADE")
    return sa.Column("tenant_id", sa.String(40), tenant, nullable=False)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        _time("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        _tenant_id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        _time("created_at"),
        _time("revoked_at", nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        _tenant_id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(80), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("request_fingerprint", sa.String(200), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    )
    op.create_index("ix_jobs_tenant_id", "jobs", ["tenant_id"])
    op.create_table(
        "stage_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        _time("lease_expires_at", nullable=True),
        sa.Column("submission_id", sa.String(100), nullable=True),
        sa.Column("checkpoint_uri", sa.Text(), nullable=True),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("progress_step", sa.Integer(), nullable=True),
        sa.Column("total_steps", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(100), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("error_field", sa.String(200), nullable=True),
        sa.Column("retryable", sa.Boolean(), nullable=True),
        _time("created_at"),
        _time("queued_at", nullable=True),
        _time("started_at", nullable=True),
        _time("finished_at", nullable=True),
        _time("updated_at"),
        sa.UniqueConstraint("job_id", "index", name="uq_stage_runs_job_index"),
    )
    op.create_index("ix_stage_runs_state_queued_at", "stage_runs", ["state", "queued_at"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(200), primary_key=True),
        _tenant_id(),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column(
            "stage_run_id", sa.String(40), sa.ForeignKey("stage_runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("lineage", sa.String(200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("manifest_hash", sa.String(80), nullable=False),
        sa.Column("parents", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _time("created_at"),
    )
    for column in ("tenant_id", "job_id", "stage_run_id"):
        op.create_index(f"ix_artifacts_{column}", "artifacts", [column])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column(
            "stage_run_id", sa.String(40), sa.ForeignKey("stage_runs.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("attempt", sa.Integer(), nullable=True),
        _time("time"),
        sa.Column("level", sa.String(20), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
    )
    op.create_index("ix_events_job_id_id", "events", ["job_id", "id"])


def downgrade() -> None:
    for table in ("events", "artifacts", "stage_runs", "jobs", "api_keys", "tenants"):
        op.drop_table(table)
