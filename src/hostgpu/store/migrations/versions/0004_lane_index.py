"""Lease lanes: the queue indexed by (function, requirement kind) before lease order.

The single queue index let a worker read jobs in lease order, but a worker whose jobs sat
behind a deep backlog it cannot run (another function's, or jobs needing a device it lacks)
walked the whole backlog on every lease (7-10x the near-empty cost at 100,000 jobs). The
lease now reads one lane per (published function, servable kind), each in order with its
own LIMIT, through this index.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

QUEUED = sa.text("state = 'queued'")
FALLBACK = sa.text("state = 'queued' AND fallback = 'cpu'")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_lane",
        "jobs",
        ["function", "gpu_kind", sa.text("priority DESC"), "run_after", "created_at"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.create_index(
        "ix_jobs_fallback",
        "jobs",
        ["function", "fallback_at"],
        sqlite_where=FALLBACK,
        postgresql_where=FALLBACK,
    )
    op.drop_index("ix_jobs_queue", table_name="jobs")


def downgrade() -> None:
    op.drop_index("ix_jobs_fallback", table_name="jobs")
    op.create_index(
        "ix_jobs_queue",
        "jobs",
        [sa.text("priority DESC"), "run_after", "created_at"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.drop_index("ix_jobs_lane", table_name="jobs")
