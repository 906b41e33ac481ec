"""Initial schema: jobs, attempts, workers, tokens.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hostgpu.store.migrations.indexes import create_queue_index

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("function", sa.String(300), nullable=False),
        sa.Column("module", sa.String(300), nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("serializer", sa.String(16), nullable=False, server_default="json"),
        sa.Column("gpu_kind", sa.String(16), nullable=False),
        sa.Column("gpu_name", sa.String(100)),
        sa.Column("min_memory_gb", sa.Float),
        sa.Column("labels", sa.Text),
        sa.Column("fallback", sa.String(16)),
        sa.Column("fallback_at", sa.Float),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("timeout_s", sa.Float, nullable=False),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("idempotency_key", sa.String(200), unique=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("worker_id", sa.String(32)),
        sa.Column("device", sa.String(100)),
        sa.Column("fallback_used", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("timings", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("run_after", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float),
    )
    create_queue_index()
    op.create_index("ix_jobs_state_expiry", "jobs", ["state", "lease_expires_at"])
    op.create_index("ix_jobs_finished", "jobs", ["finished_at"])
    op.create_index("ix_jobs_created", "jobs", ["created_at"])
    op.create_table(
        "attempts",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("worker_id", sa.String(32)),
        sa.Column("device", sa.String(100)),
        sa.Column("lease_token", sa.String(32)),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("outcome", sa.String(32)),
        sa.Column("error", sa.Text),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("capabilities", sa.Text, nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float),
    )


def downgrade() -> None:
    for table in ("tokens", "workers", "attempts", "jobs"):
        op.drop_table(table)
