"""Replace the (state, expiry) index with a partial index over active jobs.

With the (state, lease_expires_at) index SQLite's planner answered every lease by
reading all queued jobs through it and sorting them, so leasing slowed down linearly
with the backlog. Requeueing expired leases only ever looks at leased/running jobs,
which a partial index covers; the lease query then uses the queue index.

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

from hostgpu.store.migrations.indexes import create_partial_index

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.drop_index("ix_jobs_state_expiry", table_name="jobs")
    create_partial_index(
        "ix_jobs_active_expiry", "jobs", ["lease_expires_at"], "state IN ('leased', 'running')"
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_active_expiry", table_name="jobs")
    op.create_index("ix_jobs_state_expiry", "jobs", ["state", "lease_expires_at"])
