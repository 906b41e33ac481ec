"""Lease lanes: the queue indexed by function before lease order.

The single queue index let a worker read jobs in lease order, but a worker whose jobs sat
behind a deep backlog of other functions' jobs walked that whole backlog on every lease
(7-10x the near-empty cost at 100,000 jobs). The lease now reads one lane per published
function, each in order with its own LIMIT, through this index.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hostgpu.store.migrations.indexes import create_partial_index, create_queue_index

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    create_partial_index(
        "ix_jobs_lane",
        "jobs",
        ["function", sa.text("priority DESC"), "run_after", "created_at"],
        "state = 'queued'",
    )
    op.drop_index("ix_jobs_queue", table_name="jobs")


def downgrade() -> None:
    create_queue_index()
    op.drop_index("ix_jobs_lane", table_name="jobs")
