"""Index operations the migrations share.

A partial index takes the same WHERE clause on SQLite and PostgreSQL, and 0001's queue index is
created again by 0004's downgrade. Released migrations call these helpers, so what a helper
does to a database must never change: a migration that needs something else gets a new helper.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


def create_partial_index(
    name: str, table: str, columns: Sequence[str | sa.TextClause], where: str
) -> None:
    """An index over the rows matching ``where`` (SQL), on either backend."""
    clause = sa.text(where)
    op.create_index(name, table, columns, sqlite_where=clause, postgresql_where=clause)


def create_queue_index() -> None:
    """The queued jobs in lease order (0001; 0004 replaced it with the lane index)."""
    create_partial_index(
        "ix_jobs_queue",
        "jobs",
        [sa.text("priority DESC"), "run_after", "created_at"],
        "state = 'queued'",
    )
