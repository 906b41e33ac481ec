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

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

QUEUED = sa.text("state = 'queued'")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_lane",
        "jobs",
        ["function", sa.text("priority DESC"), "run_after", "created_at"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.drop_index("ix_jobs_queue", table_name="jobs")


def downgrade() -> None:
    op.create_index(
        "ix_jobs_queue",
        "jobs",
        [sa.text("priority DESC"), "run_after", "created_at"],
        sqlite_where=QUEUED,
        postgresql_where=QUEUED,
    )
    op.drop_index("ix_jobs_lane", table_name="jobs")
