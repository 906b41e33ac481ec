"""Published functions and their declared options; retries and lost leases counted apart;
token expiry.

- ``functions``: what workers publish (``@hostgpu.function`` options), so a job submitted
  without options (CLI, curl) runs as its function declares.
- ``jobs.resolved``/``jobs.requested``: a job submitted before any worker published its
  function waits, with the submission's explicit options kept, until a declaration arrives.
- ``jobs.failures``/``jobs.lost``: the job's own failures count against its retries; leases
  lost because a worker died count against a separate, higher limit.
- ``tokens.expires_at``.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from hostgpu.store.migrations.indexes import create_partial_index

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "functions",
        sa.Column("function", sa.String(300), primary_key=True),
        sa.Column("module", sa.String(300), nullable=False),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("worker_id", sa.String(32)),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_functions_module", "functions", ["module"])
    # Plain ALTER TABLE ADD COLUMN, not a batch: SQLite's batch mode copies the table and
    # re-creates its indexes from reflection, which drops the DESC of the queue index (and
    # the lease then sorts the queue again).
    op.add_column("jobs", sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("lost", sa.Integer, nullable=False, server_default="0"))
    op.add_column(
        "jobs", sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.text("true"))
    )
    op.add_column("jobs", sa.Column("requested", sa.Text))
    # Jobs from before this migration counted every attempt against retries.
    op.execute("UPDATE jobs SET failures = attempts WHERE state IN ('failed', 'queued')")
    create_partial_index(
        "ix_jobs_pending", "jobs", ["created_at"], "resolved = false AND state = 'queued'"
    )
    op.add_column("tokens", sa.Column("expires_at", sa.Float))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("expires_at")
    op.drop_index("ix_jobs_pending", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("requested")
        batch.drop_column("resolved")
        batch.drop_column("lost")
        batch.drop_column("failures")
    op.drop_index("ix_functions_module", table_name="functions")
    op.drop_table("functions")
