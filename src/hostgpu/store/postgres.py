"""PostgreSQL backend (psycopg 3): several gateways share one queue with SKIP LOCKED."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, Insert, Select, Table, create_engine, func, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url

from hostgpu.store.sql import SQLStore

# Any constant shared by every hostgpu gateway: it names the advisory lock that
# serialises schema migrations when several gateways start at once.
MIGRATION_LOCK_ID = 0x686F73747067


def normalise_url(url: str) -> str:
    """postgresql://… and postgres://… both mean psycopg 3."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class PostgresStore(SQLStore):
    def _create_engine(self, url: str) -> Engine:
        return create_engine(normalise_url(url), pool_size=16, max_overflow=16, pool_pre_ping=True)

    def _lock(self, query: Select[Any]) -> Select[Any]:
        # Concurrent lessees skip rows another transaction holds instead of waiting:
        # no job is leased twice, and no gateway blocks on another.
        return query.with_for_update(skip_locked=True)

    def _migration_lock(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})

    def _before_lease(self, conn: Connection) -> None:
        # The queue index already yields jobs in lease order. With statistics that lag a
        # bulk enqueue (autovacuum analyses about once a minute), the planner thinks the
        # queue is tiny and reads all of it to sort it: 150 ms per lease at 100,000 queued
        # jobs instead of 0.1 ms. Sorting is never the right plan here, so rule it out.
        conn.execute(text("SET LOCAL enable_sort = off"))

    def _upsert(self, table: Table, rows: list[dict[str, Any]], key: str) -> Insert:
        stmt = pg_insert(table).values(rows)
        changed = {c: stmt.excluded[c] for c in rows[0] if c != key}
        return stmt.on_conflict_do_update(index_elements=[key], set_=changed)

    def _position(self, haystack: Any, needle: Any) -> Any:
        return func.strpos(haystack, needle)
