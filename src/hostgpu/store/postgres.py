"""PostgreSQL backend (psycopg 3): several gateways share one queue with SKIP LOCKED."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Insert, Select, Table, create_engine, func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url

from hostgpu.store.interface import MAX_BROADCAST_BYTES
from hostgpu.store.schema import jobs
from hostgpu.store.sql import SQLStore

log = logging.getLogger("hostgpu.store")
#: The LISTEN/NOTIFY channel gateways on one database tell each other about changes on.
CHANNEL = "hostgpu"

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
    shared = True

    def _create_engine(self, url: str) -> Engine:
        # Prepared statements from the first execution: the lease statement (one lane per
        # function and kind) costs more to plan than to run.
        return create_engine(
            normalise_url(url),
            pool_size=16,
            max_overflow=16,
            pool_pre_ping=True,
            connect_args={"prepare_threshold": 1},
        )

    def _lock(self, query: Select[Any]) -> Select[Any]:
        # Concurrent gateways skip rows another transaction holds instead of waiting.
        return query.with_for_update(skip_locked=True)

    def _for_update(self, query: Select[Any]) -> Select[Any]:
        return query.with_for_update()

    def _claim(self, conn: Connection, rows: Sequence[Any]) -> Sequence[Any]:
        # The lanes query cannot lock (UNION): lock the candidates by id, skipping those
        # another lessee holds, so no job is leased twice and no gateway waits on another.
        if not rows:
            return rows
        locked = set(
            conn.execute(
                select(jobs.c.id)
                .where(jobs.c.id.in_([r.id for r in rows]), jobs.c.state == "queued")
                .with_for_update(skip_locked=True)
            ).scalars()
        )
        return [r for r in rows if r.id in locked]

    def _relax(self, conn: Connection) -> None:
        # Leases and heartbeats only: one lost in a crash is leased or sent again, so
        # at-least-once holds without waiting for the WAL flush. Enqueues and results stay
        # durable.
        conn.execute(text("SET LOCAL synchronous_commit = off"))

    def _emit(self, conn: Connection, topic: str) -> None:
        conn.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": CHANNEL, "payload": f"{self.origin}:{topic}"},
        )

    def broadcast(self, topic: str, payloads: Sequence[str]) -> None:
        for payload in payloads:
            if len(payload.encode()) > MAX_BROADCAST_BYTES:
                raise ValueError(f"a {topic} broadcast of {len(payload.encode())} bytes")
        with self._write() as conn:
            # Nothing to keep: the listeners hear it at commit, durable or not.
            self._relax(conn)
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                [{"channel": CHANNEL, "payload": f"{self.origin}:{topic}:{p}"} for p in payloads],
            )

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        listener = _Listener(self.url, self.origin, callback)
        listener.start()
        return listener.stop

    def _migration_lock(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})

    def _before_lease(self, conn: Connection) -> None:
        self._relax(conn)

    def _upsert(self, table: Table, rows: list[dict[str, Any]], key: str) -> Insert:
        stmt = pg_insert(table).values(rows)
        changed = {c: stmt.excluded[c] for c in rows[0] if c != key}
        return stmt.on_conflict_do_update(index_elements=[key], set_=changed)

    def _position(self, haystack: Any, needle: Any) -> Any:
        return func.strpos(haystack, needle)

    def _floor(self, value: Any) -> Any:
        return func.floor(value)


class _Listener(threading.Thread):
    """LISTEN on the channel and hand other stores' events to ``callback`` (from this thread).

    On a lost connection it reconnects with a backoff and reports a ``resync`` event, so the
    gateway wakes every waiter once: nothing said while it was away is lost for good.
    """

    def __init__(self, url: str, origin: str, callback: Callable[[str], None]) -> None:
        super().__init__(name="hostgpu-listen", daemon=True)
        parsed = make_url(normalise_url(url)).set(drivername="postgresql")
        self.dsn = parsed.render_as_string(hide_password=False)
        self.origin = origin
        self.callback = callback
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        import psycopg

        delay = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.callback("resync")
                    delay = 0.1
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            origin, _, topic = note.payload.partition(":")
                            # Our own events come back too: as "echo:…", so a gateway can
                            # tell when every listener has been told (see token revocation).
                            self.callback(topic if origin != self.origin else f"echo:{topic}")
            except Exception as exc:  # the database went away: try again
                log.warning("event listener lost its connection (%s); reconnecting", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
