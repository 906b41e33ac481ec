"""PostgreSQL backend (psycopg 3): several gateways share one queue with SKIP LOCKED."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    ARRAY,
    Connection,
    Engine,
    Select,
    String,
    any_,
    bindparam,
    create_engine,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from hostgpu.jobs import Event, JobState, target
from hostgpu.store.interface import MAX_BROADCAST_BYTES
from hostgpu.store.sql import SQLStore, _Pick

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


#: A pooled connection idle for longer than this is pinged before use (a restarted database
#: has closed it); one in steady use is not, which saves a round trip per transaction.
PING_IDLE_S = 1.0

# One lease, in one statement (so, in autocommit, one round trip and its own transaction):
# lock the picked candidates that are still queued, skipping those another lessee holds (no
# job is leased twice, no gateway waits on another), lease them, open their attempts and mark
# the worker alive. The picks come as arrays, so the statement is prepared once.
_TAKE = """
    WITH picked AS (
        SELECT * FROM unnest(
            CAST(%(ids)s AS varchar[]), CAST(%(tokens)s AS varchar[]),
            CAST(%(devices)s AS varchar[]), CAST(%(fallbacks)s AS boolean[])
        ) AS p (id, token, device, fallback)
    ), claimed AS (
        SELECT id FROM jobs
        WHERE id = ANY(CAST(%(ids)s AS varchar[])) AND state = %(queued)s AND run_after <= %(now)s
        FOR UPDATE SKIP LOCKED
    ), leased AS (
        UPDATE jobs SET
            state = %(leased)s, lease_token = picked.token, lease_expires_at = %(expires)s,
            worker_id = %(worker)s, device = picked.device, fallback_used = picked.fallback,
            attempts = jobs.attempts + 1, updated_at = %(now)s
        FROM picked
        WHERE jobs.id = ANY(ARRAY(SELECT id FROM claimed)) AND picked.id = jobs.id
        RETURNING jobs.id, jobs.attempts, picked.token, picked.device
    ), opened AS (
        INSERT INTO attempts (job_id, attempt, worker_id, device, lease_token, started_at)
        SELECT id, attempts, %(worker)s, device, token, %(now)s FROM leased
    ), touched AS (
        UPDATE workers SET
            last_seen = %(now)s,
            state = CASE WHEN workers.state = 'draining' THEN 'draining' ELSE 'active' END
        WHERE id = %(worker)s
    )
    SELECT id, attempts FROM leased
    """


def _ping_when_idle(engine: Engine) -> None:
    """Check a connection that has been idle a while before handing it out (instead of
    SQLAlchemy's ``pool_pre_ping``, which pings before every checkout)."""

    @event.listens_for(engine, "checkin")
    def _idle(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return
        try:
            dbapi_conn.execute("SELECT 1")
            if not dbapi_conn.autocommit:
                dbapi_conn.rollback()
        except Exception as exc:  # closed by a restart, or a network cut: a new one
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


class PostgresStore(SQLStore):
    shared = True
    _dialect_insert = staticmethod(pg_insert)

    def _create_engine(self, url: str) -> Engine:
        # Prepared statements from the first execution: the lease statement (one lane per
        # function and kind) costs more to plan than to run.
        # At most 24 + 16 connections, and one for LISTEN: 41 per gateway (33 before the
        # quick pool), so two gateways fit in PostgreSQL's default 100 (97 for users). More
        # gateways: raise max_connections, or put PgBouncer in transaction mode in front.
        engine = create_engine(
            normalise_url(url),
            pool_size=12,
            max_overflow=12,
            connect_args={"prepare_threshold": 1},
        )
        _ping_when_idle(engine)
        # Reads in autocommit: no BEGIN and ROLLBACK round trips around them. Under READ
        # COMMITTED each statement read its own snapshot already: no read relied on more.
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        # Quick writes (leases, heartbeats, broadcasts): autocommit, each statement safe on
        # its own, and a commit that does not wait for the WAL flush (see ``_quick``). Their
        # plans are made for each execution's values: a generic plan cached while the queue
        # was nearly empty scanned the whole queue once it was not (a lease behind 30,000
        # jobs took 18 ms instead of 2.6; benchmarks/load.py).
        self._quick_engine = create_engine(
            normalise_url(url),
            isolation_level="AUTOCOMMIT",
            pool_size=4,
            max_overflow=12,
            connect_args={
                "prepare_threshold": 1,
                "options": "-c synchronous_commit=off",
            },
        )
        _ping_when_idle(self._quick_engine)
        return engine

    def close(self) -> None:
        super().close()
        self._quick_engine.dispose()

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        self.transactions["read"] += 1
        # A snapshot (a streamed blob) needs a transaction: a server-side cursor lives in one.
        with self._translated(), (self.engine if snapshot else self._reader).connect() as conn:
            yield conn

    @contextmanager
    def _quick(self) -> Iterator[Connection]:
        self.transactions["write"] += 1
        with self._translated(), self._quick_engine.connect() as conn:
            yield conn

    def _unreachable(self, exc: DBAPIError) -> bool:
        # No SQLSTATE: the connection could not be made (refused, reset, timed out). Class
        # 08: connection exceptions; 57P: the server is shutting down or starting up;
        # 53300: too many connections.
        if not isinstance(exc, OperationalError):
            return False
        state = getattr(exc.orig, "sqlstate", None)
        return state is None or state.startswith(("08", "57P")) or state == "53300"

    def _lock(self, query: Select[Any]) -> Select[Any]:
        # Concurrent gateways skip rows another transaction holds instead of waiting.
        return query.with_for_update(skip_locked=True)

    def _for_update(self, query: Select[Any]) -> Select[Any]:
        return query.with_for_update()

    def _ids_in(self, column: Any) -> Any:
        # One array parameter, not a placeholder per id: the statement's text is the same for
        # any number of ids, so psycopg converts it once and the server plans it once (a
        # .map's long poll asks for 1,000 ids at a time).
        return column == any_(bindparam("b_ids", type_=ARRAY(String)))

    def _take(
        self, conn: Connection, worker_id: str, now: float, expires: float, picks: list[_Pick]
    ) -> dict[str, int]:
        # The candidates were read outside any lock: another gateway may have leased some
        # since. Those are skipped here, and the rest taken, in one statement.
        # Planned for these values each time (not prepared): a generic plan cached while the
        # queue was nearly empty scanned the whole queue once it was not.
        taken = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
            _TAKE,
            {
                "ids": [p.row.id for p in picks],
                "tokens": [p.token for p in picks],
                "devices": [p.device.torch_device for p in picks],
                "fallbacks": [p.fallback_used for p in picks],
                "queued": JobState.queued.value,
                "leased": target(Event.lease),
                "expires": expires,
                "worker": worker_id,
                "now": now,
            },
            prepare=False,
        )
        return {job_id: attempt for job_id, attempt in taken}

    def _emit(self, conn: Connection, topic: str) -> None:
        conn.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": CHANNEL, "payload": f"{self.origin}:{topic}"},
        )

    def broadcast(self, topic: str, payloads: Sequence[str]) -> None:
        for payload in payloads:
            if len(payload.encode()) > MAX_BROADCAST_BYTES:
                raise ValueError(f"a {topic} broadcast of {len(payload.encode())} bytes")
        # Nothing to keep: the listeners hear it at commit, durable or not.
        with self._quick() as conn:
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
