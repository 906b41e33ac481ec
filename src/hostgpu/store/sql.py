"""The store, written once in SQLAlchemy Core; the backends differ only in how they lock.

SQLite serialises writers with ``BEGIN IMMEDIATE``; PostgreSQL lets several gateways lease
at once with ``SELECT … FOR UPDATE SKIP LOCKED``. Everything else (fencing, idempotency) is
the same SQL on both. Every state change is fenced by the states :data:`hostgpu.jobs.
TRANSITIONS` allows for its event; the retry decision is the injected
:class:`~hostgpu.retry.RetryPolicy`'s.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Float,
    Insert,
    Integer,
    Select,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.sql import ColumnElement

from hostgpu.capabilities import Capabilities, Device, WorkerInfo
from hostgpu.errors import (
    AmbiguousId,
    DuplicateKey,
    InvalidInput,
    InvalidTransition,
    LastAdminToken,
    NotFound,
    StoreUnavailable,
)
from hostgpu.functions import FunctionOptions, Requested, Resolved
from hostgpu.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Attempt,
    Event,
    Job,
    JobError,
    JobResult,
    JobState,
    Lease,
    Outcome,
    Payload,
    ReportResult,
    readable_json,
    sources,
    target,
)
from hostgpu.requirements import Requirements
from hostgpu.retry import RetryPolicy
from hostgpu.routing import GIB, SATISFIES, canonical_labels, label_subsets, pick_device
from hostgpu.stats import ExpiredLease, JobFacts, QueueGroup, ThroughputBucket, WorkerLoad
from hostgpu.store import figures
from hostgpu.store.blobs import FileBlobs, TableBlobs
from hostgpu.store.interface import (
    MAX_BROADCAST_BYTES,
    BlobInfo,
    HeartbeatResult,
    JobFilter,
    NewJob,
    Pending,
    Store,
)
from hostgpu.store.many import Many
from hostgpu.store.schema import attempts, blobs, functions, job_inputs, jobs, tokens, workers
from hostgpu.tokens import TOKEN_ID_LENGTH, TokenInfo

log = logging.getLogger("hostgpu.store")
ACTIVE = sorted(s.value for s in ACTIVE_STATES)
#: The requirement kinds a job's ``gpu`` can name (``cuda:<name>`` is kind cuda).
REQUIREMENT_KINDS = frozenset(k for kinds in SATISFIES.values() for k in kinds)
LEASE_COLUMNS = (
    jobs.c.id,
    jobs.c.function,
    jobs.c.payload,
    jobs.c.serializer,
    jobs.c.timeout_s,
    jobs.c.attempts,
    jobs.c.gpu_kind,
    jobs.c.gpu_name,
    jobs.c.min_memory_gb,
    jobs.c.labels,
    jobs.c.fallback,
    jobs.c.fallback_at,
    jobs.c.priority,
    jobs.c.run_after,
    jobs.c.created_at,
    jobs.c.inputs,
)
TERMINAL = sorted(s.value for s in TERMINAL_STATES)
MIGRATIONS = Path(__file__).parent / "migrations"
#: How many times a lease reads again after concurrent lessees took its candidates first.
LEASE_TRIES = 3
FULL_ID_LENGTH = 32
#: How many of the ids an ambiguous prefix matches its error names.
AMBIGUOUS_SHOWN = 5


# The job columns a Job takes as they are stored; the others are decoded in ``_to_job``.
_JOB_AS_STORED = (
    "id",
    "function",
    "serializer",
    "fallback",
    "priority",
    "timeout_s",
    "max_retries",
    "idempotency_key",
    "attempts",
    "failures",
    "lost",
    "worker_id",
    "device",
)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(readable_json(value))


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _dt_opt(ts: float | None) -> datetime | None:
    return None if ts is None else _dt(ts)


def _payload_json(payload: Payload | str | None) -> str | None:
    if isinstance(payload, Payload):
        return _dumps(payload.model_dump(mode="json"))
    return _dumps(payload)


def _same_call(key: str, job: NewJob, function: str, payload: str | None) -> None:
    """A key names one call: reused for another function or other arguments, the second
    call would be silently dropped (the draft IETF Idempotency-Key header answers 422)."""
    if function == job.function and (
        # Pickled arguments need not pickle alike from one process to the next (a set's
        # order follows string hashing): for them, the function is all that can be checked.
        isinstance(job.payload, str) or _loads(payload) == _loads(_payload_json(job.payload))
    ):
        return
    raise InvalidInput(
        f"idempotency key {key!r} was first used for another call ({function} with other "
        "arguments): a key names one call; give this one a new key"
    )


def _error(value: str | None) -> JobError | None:
    raw = _loads(value)
    if raw is None:
        return None
    try:
        return JobError.model_validate(raw)
    except ValueError:  # written by an older version in another shape
        return JobError(type=str(raw.get("type", "Error")), message=str(raw.get("message", raw)))


def _in(column: Any, values: Sequence[str]) -> Any:
    """``column IN ('a', 'b')`` with literals: only then can SQLite (and a generic PostgreSQL
    plan) prove a partial index on the state applies (and ``=`` for one value: SQLite does not
    read ``IN ('queued')`` as ``= 'queued'`` when it matches partial indexes)."""
    if len(values) == 1:
        return column == literal_column(f"'{values[0]}'")
    return column.in_([literal_column(f"'{v}'") for v in values])


# -- hot statements, built once ---------------------------------------------------------------
# A statement built per call is re-coerced and re-keyed for SQLAlchemy's compiled cache on
# every execution: that was about 60% of a lease's and a report's time in the store. These are
# built once, so only their parameters change; the ``b_`` names keep them apart from columns.
_NOW = bindparam("b_now", type_=Float)
_BY_ID = jobs.c.id == bindparam("b_id")
_FENCED = and_(_BY_ID, jobs.c.lease_token == bindparam("b_token"))
_OF_LEASE = and_(
    attempts.c.job_id == bindparam("b_id"), attempts.c.lease_token == bindparam("b_token")
)
#: A draining worker stays draining: its heartbeats keep it alive, not leasing.
_ALIVE = case((workers.c.state == "draining", "draining"), else_="active")
_GET_JOB = select(jobs).where(_BY_ID)
_INSERT_JOBS = insert(jobs)
_INSERT_ATTEMPTS = insert(attempts)
_TOUCH = (
    update(workers)
    .where(workers.c.id == bindparam("b_worker"))
    .values(last_seen=_NOW, state=_ALIVE)
)
_LEASE_JOB = (
    update(jobs)
    .where(_BY_ID)
    .values(
        state=target(Event.lease),
        lease_token=bindparam("b_token"),
        lease_expires_at=bindparam("b_expires", type_=Float),
        worker_id=bindparam("b_worker"),
        device=bindparam("b_device"),
        fallback_used=bindparam("b_fallback"),
        attempts=jobs.c.attempts + 1,
        updated_at=_NOW,
    )
)
_CLOSE_ATTEMPT = (
    update(attempts)
    .where(_OF_LEASE)
    .values(outcome=bindparam("b_outcome"), finished_at=_NOW, error=bindparam("b_error"))
)
_DROP_ATTEMPT = delete(attempts).where(_OF_LEASE)


def _transition(event: Event, **values: Any) -> Any:
    """One executemany statement: the rows' jobs, still under their lease, take ``event``."""
    return (
        update(jobs)
        .where(_FENCED, _in(jobs.c.state, sources(event)))
        .values(state=target(event), updated_at=_NOW, **values)
    )


_START = _transition(Event.start)
_SUCCEED = _transition(
    Event.succeed,
    result=bindparam("b_result"),
    error=None,
    timings=bindparam("b_timings"),
    device=func.coalesce(bindparam("b_device"), jobs.c.device),
    finished_at=_NOW,
)
_RELEASE = _transition(
    Event.release,
    attempts=jobs.c.attempts - 1,
    lease_token=None,
    worker_id=None,
    run_after=_NOW,
)
_FAILURE = {
    "failures": jobs.c.failures + 1,
    "error": bindparam("b_error"),
    "timings": bindparam("b_timings"),
}
_RETRY = _transition(
    Event.retry, **_FAILURE, lease_token=None, run_after=bindparam("b_run_after", type_=Float)
)
_FAIL = _transition(Event.fail, **_FAILURE, finished_at=bindparam("b_finished", type_=Float))


def _requirements(row: Any) -> Requirements:
    return Requirements(
        gpu=row.gpu_kind + (f":{row.gpu_name}" if row.gpu_name else ""),
        min_memory_gb=row.min_memory_gb,
        labels=_loads(row.labels) or {},
    )


def _option_columns(options: Resolved) -> dict[str, Any]:
    req = options.requirements
    return {
        "serializer": options.serializer,
        "gpu_kind": req.kind,
        "gpu_name": req.name,
        "min_memory_gb": req.min_memory_gb,
        "labels": canonical_labels(req.labels),
        "fallback": options.fallback,
        "priority": options.priority,
        "timeout_s": options.timeout_s,
        "max_retries": options.max_retries,
    }


#: At most this many kinds of job are described in a ``runnable`` event (else: no details).
RUNNABLE_KINDS = 16
#: What makes a job's kind: who may run it.
_KIND_COLUMNS = ("function", "gpu_kind", "gpu_name", "min_memory_gb", "labels", "fallback")


def _runnable_topic(rows: list[dict[str, Any]]) -> str:
    """``runnable``, and what runs the new jobs when they are of a few kinds: ``runnable:`` and
    JSON ``[[function, requirements, fallback, count], …]``. Other gateways then wake one
    fitting worker per job, as the submitting gateway does, instead of every idle one."""
    kinds = Counter(tuple(r[c] for c in _KIND_COLUMNS) for r in rows if r["resolved"])
    if not kinds or len(kinds) > RUNNABLE_KINDS:
        return "runnable"
    described = [
        [
            kind[0],
            _requirements(_RowView(dict(zip(_KIND_COLUMNS, kind, strict=True)))).model_dump(
                mode="json", exclude_none=True
            ),
            kind[5],
            count,
        ]
        for kind, count in kinds.items()
    ]
    topic = "runnable:" + json.dumps(described, separators=(",", ":"))
    return topic if len(topic.encode()) <= MAX_BROADCAST_BYTES else "runnable"


class SQLStore(Store):
    """Shared implementation; subclasses provide the engine and the lease lock."""

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        fallback_grace_s: float = 30.0,
        worker_ttl_s: float = 30.0,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.fallback_grace_s = fallback_grace_s
        self.worker_ttl_s = worker_ttl_s
        self.engine = self._create_engine(url)
        #: This store's id in the events it publishes, so a gateway can skip its own.
        self.origin = uuid.uuid4().hex[:12]
        self.transactions = {"read": 0, "write": 0}
        self._lane_cache: dict[str, Select[Any]] = {}
        #: The hot executemany statements, run through the driver (see store/many.py).
        self._many = Many()
        #: The fence facts of reported jobs, locked on PostgreSQL (built once, like the
        #: statements at the top of this module).
        self._fences = self._for_update(
            select(
                jobs.c.id, jobs.c.state, jobs.c.lease_token, jobs.c.failures, jobs.c.max_retries
            ).where(self._ids_in(jobs.c.id))
        )
        #: Jobs by id (``b_ids``), and only the finished ones (a ``.map``'s long poll).
        self._get_many = select(jobs).where(self._ids_in(jobs.c.id))
        self._get_finished = self._get_many.where(_in(jobs.c.state, TERMINAL))
        self._known = select(jobs.c.id).where(self._ids_in(jobs.c.id))
        self._get_results = select(
            jobs.c.id, jobs.c.function, jobs.c.state, jobs.c.attempts, jobs.c.result, jobs.c.error
        ).where(self._ids_in(jobs.c.id), _in(jobs.c.state, TERMINAL))
        self._migrate()

    # -- backend hooks ------------------------------------------------------------------
    def _create_engine(self, url: str) -> Engine:
        raise NotImplementedError

    def _lock(self, query: Select[Any]) -> Select[Any]:
        """Make a requeue SELECT safe against concurrent gateways (skip what others hold)."""
        return query

    def _for_update(self, query: Select[Any]) -> Select[Any]:
        """Lock the selected rows until commit, waiting for other holders."""
        return query

    def _ids_in(self, column: Any) -> Any:
        """``column`` is one of the list bound as ``b_ids`` (a list of any length)."""
        return column.in_(bindparam("b_ids", expanding=True))

    def _migration_lock(self, conn: Connection) -> None:
        """Serialise concurrent migrations (several gateways starting together)."""

    #: The backend dialect's INSERT, which has ``ON CONFLICT`` (SQLite's and PostgreSQL's).
    _dialect_insert: Callable[[Table], Any]

    def _upsert(self, table: Table, rows: list[dict[str, Any]], key: str) -> Insert:
        """INSERT … ON CONFLICT (key) DO UPDATE of the other columns."""
        stmt = self._dialect_insert(table).values(rows)
        changed = {c: stmt.excluded[c] for c in rows[0] if c != key}
        return stmt.on_conflict_do_update(index_elements=[key], set_=changed)

    def _position(self, haystack: Any, needle: Any) -> Any:
        """1-based position of ``needle`` in ``haystack``, 0 when absent (no LIKE wildcards)."""
        raise NotImplementedError

    def _blobs(self) -> FileBlobs | TableBlobs:
        """Where this backend keeps blob bytes."""
        return TableBlobs()

    def _emit(self, conn: Connection, topic: str) -> None:
        """Tell every gateway on this database, at commit, that ``topic`` happened."""

    def _floor(self, value: Any) -> Any:
        """The integer part of a non-negative number. CAST truncates on SQLite (whose
        ``floor()`` exists only in builds with the math functions); PostgreSQL's CAST
        rounds, so it overrides this."""
        return cast(value, Integer)

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self.transactions["write"] += 1
        with self._translated(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _quick(self) -> Iterator[Connection]:
        """Writes whose loss in a crash is harmless (leases, heartbeats, broadcasts): a lease
        lost is leased again, a heartbeat sent again, so at-least-once holds. A backend may
        commit them without waiting for the disk, and each of their statements on its own
        (PostgreSQL); each is then written to be safe alone. Here: a write transaction."""
        with self._write() as conn:
            yield conn

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        """A read. ``snapshot``: in one transaction, so a cursor may stream its rows (on
        PostgreSQL a server-side cursor lives in a transaction)."""
        self.transactions["read"] += 1
        with self._translated(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Driver errors about a value become the caller's mistake (a 4xx), not a crash."""
        try:
            yield
        except DataError as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc)
            raise InvalidInput(f"the database refused a value: {reason}") from exc
        except DBAPIError as exc:
            if not (exc.connection_invalidated or self._unreachable(exc)):
                raise
            # The connection died under this call, or none could be made (the database is
            # restarting, refuses connections, or the network dropped). The pool lets go of
            # its broken connections; a later call gets new ones.
            raise StoreUnavailable(
                f"the database is unreachable ({str(exc.orig or exc).splitlines()[0]}); "
                "try again in a moment"
            ) from exc
        except PoolTimeout as exc:
            raise StoreUnavailable(
                "every database connection is busy; try again in a moment"
            ) from exc

    def _unreachable(self, exc: DBAPIError) -> bool:
        """Whether the driver's error says the database cannot be reached (not a bad query)."""
        return False

    def _migrate(self) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self._write() as conn:
            self._migration_lock(conn)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def close(self) -> None:
        self.engine.dispose()

    # -- conversions ---------------------------------------------------------------------
    def _to_job(self, row: Any, history: list[Attempt] | None = None) -> Job:
        return Job(
            **{name: getattr(row, name) for name in _JOB_AS_STORED},
            payload=_loads(row.payload),
            requirements=_requirements(row),
            resolved=bool(row.resolved),
            state=JobState(row.state),
            fallback_used=bool(row.fallback_used),
            result=_loads(row.result),
            error=_error(row.error),
            timings=_loads(row.timings),
            created_at=_dt(row.created_at),
            updated_at=_dt(row.updated_at),
            run_after=_dt(row.run_after),
            finished_at=_dt_opt(row.finished_at),
            history=history,
        )

    # -- jobs ----------------------------------------------------------------------------
    def enqueue(self, new: Sequence[NewJob]) -> list[Job]:
        try:
            return self._enqueue(new)
        except IntegrityError:
            # Another gateway inserted the same idempotency key between our read and
            # our insert: the second pass finds its job.
            try:
                return self._enqueue(new)
            except IntegrityError as exc:  # pragma: no cover - needs a three-way race
                raise DuplicateKey("idempotency key conflict; retry the request") from exc

    def _enqueue(self, new: Sequence[NewJob]) -> list[Job]:
        now = time.time()
        keys = [j.idempotency_key for j in new if j.idempotency_key]
        with self._write() as conn:
            existing: dict[str, Any] = {}
            if keys:
                for found in conn.execute(select(jobs).where(jobs.c.idempotency_key.in_(keys))):
                    existing[found.idempotency_key] = found
            rows: list[dict[str, Any]] = []
            order: list[str | dict[str, Any]] = []
            batch_keys: dict[str, dict[str, Any]] = {}
            for job in new:
                key = job.idempotency_key
                if key and key in existing:
                    _same_call(key, job, existing[key].function, existing[key].payload)
                    order.append(key)
                    continue
                if key and key in batch_keys:
                    earlier = batch_keys[key]
                    _same_call(key, job, earlier["function"], earlier["payload"])
                    order.append(earlier)
                    continue
                fallback_at = now + self.fallback_grace_s if job.options.fallback else None
                row = {
                    "id": uuid.uuid4().hex,
                    "function": job.function,
                    "module": job.function.partition(":")[0],
                    "payload": _payload_json(job.payload),
                    **_option_columns(job.options),
                    "fallback_at": fallback_at,
                    "idempotency_key": key,
                    "resolved": job.resolved,
                    "requested": job.requested.model_dump_json(exclude_none=True),
                    "inputs": _dumps(list(job.inputs)) if job.inputs else None,
                    "state": JobState.queued.value,
                    "attempts": 0,
                    "failures": 0,
                    "lost": 0,
                    "fallback_used": False,
                    "created_at": now,
                    "updated_at": now,
                    "run_after": now,
                }
                rows.append(row)
                order.append(row)
                if key:
                    batch_keys[key] = row
            if rows:
                self._many.run(conn, _INSERT_JOBS, rows)
                needs = [
                    {"job_id": r["id"], "digest": d}
                    for r in rows
                    for d in dict.fromkeys(_loads(r["inputs"]) or [])
                ]
                if needs:
                    conn.execute(insert(job_inputs), needs)
                self._emit(conn, _runnable_topic(rows) if self.shared else "runnable")
        return [
            self._to_job(existing[item]) if isinstance(item, str) else self._to_job(_RowView(item))
            for item in order
        ]

    @staticmethod
    def _find_id(
        conn: Connection,
        given: str,
        column: ColumnElement[str] = jobs.c.id,
        what: str = "job",
        length: int = FULL_ID_LENGTH,
        among: ColumnElement[bool] | None = None,
    ) -> str:
        """The full id of ``given`` or of the one row whose ``column`` (an id ``length``
        hex digits long) starts with it, among the rows ``among`` selects: NotFound, or
        AmbiguousId naming the first matches."""
        if len(given) >= length:
            return given
        if not given or not all(c in "0123456789abcdef" for c in given):
            raise NotFound(f"no {what} with id {given!r}")
        found = (
            conn.execute(
                select(column)
                .where(column.like(f"{given}%"), *([] if among is None else [among]))
                .order_by(column)
                .limit(AMBIGUOUS_SHOWN + 1)
            )
            .scalars()
            .all()
        )
        if not found:
            raise NotFound(f"no {what} with id {given!r}")
        if len(found) > 1:
            shown = ", ".join(found[:AMBIGUOUS_SHOWN]) + (
                ", ..." if len(found) > AMBIGUOUS_SHOWN else ""
            )
            raise AmbiguousId(
                f"{given!r} is the start of more than one {what} id ({shown}): give more of it"
            )
        return str(found[0])

    def get(self, job_id: str, *, history: bool = False) -> Job:
        with self._read() as conn:
            job_id = self._find_id(conn, job_id)
            row = conn.execute(_GET_JOB, {"b_id": job_id}).first()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            past = None
            if history:
                past = [
                    Attempt(
                        attempt=a.attempt,
                        worker_id=a.worker_id,
                        device=a.device,
                        started_at=_dt_opt(a.started_at),
                        finished_at=_dt_opt(a.finished_at),
                        outcome=a.outcome,
                        error=a.error,
                    )
                    for a in conn.execute(
                        select(attempts)
                        .where(attempts.c.job_id == job_id)
                        .order_by(attempts.c.attempt)
                    )
                ]
        return self._to_job(row, past)

    def get_many(self, job_ids: Sequence[str], *, terminal_only: bool = False) -> list[Job]:
        if not job_ids:
            return []
        query = self._get_finished if terminal_only else self._get_many
        with self._read() as conn:
            return [self._to_job(r) for r in conn.execute(query, {"b_ids": list(job_ids)})]

    def unknown(self, job_ids: Sequence[str]) -> list[str]:
        if not job_ids:
            return []
        with self._read() as conn:
            known = set(conn.execute(self._known, {"b_ids": list(job_ids)}).scalars())
        return [i for i in dict.fromkeys(job_ids) if i not in known]

    def results(self, job_ids: Sequence[str]) -> list[JobResult]:
        if not job_ids:
            return []
        with self._read() as conn:
            return [
                JobResult(
                    id=row.id,
                    function=row.function,
                    state=JobState(row.state),
                    attempts=row.attempts,
                    result=_loads(row.result),
                    error=_error(row.error),
                )
                for row in conn.execute(self._get_results, {"b_ids": list(job_ids)})
            ]

    def list_jobs(
        self, where: JobFilter | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        where = where or JobFilter()
        # (created_at, id) is unique and stable: jobs created in one batch share a timestamp,
        # and a cursor on the time alone would skip the rest of the batch.
        query = select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        if where.state is not None:
            query = query.where(jobs.c.state == where.state.value)
        if where.function:
            query = query.where(jobs.c.function == where.function)
        if where.worker_id:
            query = query.where(jobs.c.worker_id == where.worker_id)
        if where.device:
            query = query.where(jobs.c.device == where.device)
        if where.id_prefix:
            query = query.where(jobs.c.id.like(f"{where.id_prefix}%"))
        if cursor:
            created, job_id = _parse_cursor(cursor)
            query = query.where(tuple_(jobs.c.created_at, jobs.c.id) < tuple_(created, job_id))
        with self._read() as conn:
            rows = conn.execute(query).all()
        page = [self._to_job(r) for r in rows[:limit]]
        more = len(rows) > limit
        next_cursor = f"{rows[limit - 1].created_at!r}:{rows[limit - 1].id}" if more else None
        return page, next_cursor

    def count_by_state(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        with self._read() as conn:
            for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)):
                counts[state] = n
        return counts

    # -- leasing -------------------------------------------------------------------------
    def _device_clause(self, devices: Sequence[Device]) -> Any:
        """The SQL form of :func:`hostgpu.routing.device_satisfies` for any of ``devices``."""
        options = []
        for device in devices:
            memory_gb = (device.memory_bytes or 0) / GIB
            options.append(
                and_(
                    or_(
                        jobs.c.gpu_name.is_(None),
                        # Not LIKE: a name holding "_" or "%" must match literally.
                        self._position(literal(device.name.lower()), jobs.c.gpu_name) > 0,
                    ),
                    or_(jobs.c.min_memory_gb.is_(None), jobs.c.min_memory_gb <= memory_gb),
                )
            )
        return or_(*options) if options else literal(False)

    def _lanes_query(self, caps: Capabilities) -> Select[Any] | None:
        """The candidates a worker may lease, as one statement built once per capability set.

        One lane per published function, each read through the ``ix_jobs_lane`` index in
        lease order with its own LIMIT, then merged: a worker never walks past other
        functions' jobs, however many there are. Within a lane it skips the jobs it cannot run
        (another device), which are few in practice. ``:now`` and ``:n`` are parameters.
        """
        key = caps.model_dump_json(include={"devices", "labels", "functions"})
        cached = self._lane_cache.get(key)
        if cached is not None:
            return cached
        now = bindparam("now", type_=Float)
        limit = bindparam("n", type_=Integer)
        if caps.labels:
            labels = or_(jobs.c.labels.is_(None), jobs.c.labels.in_(label_subsets(caps.labels)))
        else:
            labels = jobs.c.labels.is_(None)
        # One condition for all the worker's devices: the job's kind is one a device serves
        # and that device meets its name and memory; or its CPU fallback is open.
        fits = [
            and_(
                jobs.c.gpu_kind.in_([literal_column(f"'{k}'") for k in SATISFIES[d.kind]]),
                self._device_clause([d]),
            )
            for d in caps.devices
        ]
        if any(d.kind == "cpu" for d in caps.devices):
            fits.append(and_(jobs.c.fallback == "cpu", jobs.c.fallback_at <= now))
        if not fits:
            return None
        lanes = [
            self._lane(function, now, limit, labels, or_(*fits))
            for function in sorted(caps.functions)
        ]
        if not lanes:
            return None
        merged = union_all(*[lane.subquery().select() for lane in lanes]).subquery("lanes")
        query = (
            select(merged)
            .order_by(merged.c.priority.desc(), merged.c.run_after, merged.c.created_at)
            .limit(limit)
        )
        if len(self._lane_cache) > 1000:  # workers come and go: keep the cache bounded
            self._lane_cache.clear()
        self._lane_cache[key] = query
        return query

    @staticmethod
    def _lane(function: str, now: Any, limit: Any, *conditions: Any) -> Select[Any]:
        return (
            select(*LEASE_COLUMNS)
            .where(
                jobs.c.state == literal_column("'queued'"),
                jobs.c.function == function,
                jobs.c.run_after <= now,
                jobs.c.resolved.is_(True),
                *conditions,
            )
            .order_by(jobs.c.priority.desc(), jobs.c.run_after, jobs.c.created_at)
            .limit(limit)
        )

    def lease(
        self,
        worker_id: str,
        caps: Capabilities,
        *,
        max_jobs: int,
        lease_seconds: float,
        probe: bool = True,
        touch_older_than: float | None = None,
    ) -> list[Lease]:
        query = self._lanes_query(caps)
        now = time.time()
        if touch_older_than is not None:
            # The worker's sign of life rides on this poll's transaction: an idle worker's
            # long poll is then one write, not a write (touch) and a read (probe).
            with self._quick() as conn:
                self._touch_if_stale(conn, worker_id, now, touch_older_than)
                if max_jobs <= 0 or query is None:
                    return []
                return self._lease_in(conn, worker_id, caps, query, now, max_jobs, lease_seconds)
        if max_jobs <= 0 or query is None:
            return []
        params = {"now": now, "n": max_jobs}
        # Read before taking the write lock: most polls of an idle fleet find nothing, and
        # then cost one read instead of a write transaction that serialises every lessee.
        # (Skipped when the caller was just told that jobs it can run arrived.)
        if probe:
            with self._read() as conn:
                if not conn.execute(query, params).first():
                    return []
        with self._quick() as conn:
            return self._lease_in(conn, worker_id, caps, query, now, max_jobs, lease_seconds)

    def _lease_in(
        self,
        conn: Connection,
        worker_id: str,
        caps: Capabilities,
        query: Select[Any],
        now: float,
        max_jobs: int,
        lease_seconds: float,
    ) -> list[Lease]:
        """Pick a device for each candidate in Python (the routing rule), then take them.

        Where candidates are read without a lock (PostgreSQL), a concurrent lessee may take
        some first; then the rest are read again, a few times at most, so that a poll does
        not come back empty while jobs it can run are queued. Each try has committed by then
        (autocommit): a later try that fails returns the leases already taken, not an error,
        or the worker would never hear of them.
        """
        expires = now + lease_seconds
        leases: list[Lease] = []
        skipped: set[str] = set()  # held by another lessee: passed over when read again
        for _ in range(LEASE_TRIES):
            need = max_jobs - len(leases)
            try:
                picks = self._picks(conn, caps, query, now, need, skipped)
                taken = self._take(conn, worker_id, now, expires, picks) if picks else {}
            except Exception:
                if not leases:
                    raise
                log.warning("a lease's second read failed; keeping its first", exc_info=True)
                break
            if not picks:
                break
            leases += [
                Lease(
                    job_id=p.row.id,
                    lease_token=p.token,
                    attempt=taken[p.row.id],
                    function=p.row.function,
                    payload=_loads(p.row.payload),
                    serializer=p.row.serializer,
                    timeout_s=p.row.timeout_s,
                    device=p.device,
                    fallback_used=p.fallback_used,
                    lease_expires_at=_dt(expires),
                    inputs=_loads(p.row.inputs) or [],
                )
                for p in picks
                if p.row.id in taken
            ]
            if len(taken) == len(picks) or len(leases) >= max_jobs:
                break
            skipped.update(p.row.id for p in picks if p.row.id not in taken)
        return leases

    def _picks(
        self,
        conn: Connection,
        caps: Capabilities,
        query: Select[Any],
        now: float,
        need: int,
        skipped: set[str],
    ) -> list[_Pick]:
        """Up to ``need`` candidates in lease order, past ``skipped``, each with the device
        the routing rule picks for it. Reads ``len(skipped)`` rows more, in case those are
        still queued (held, not yet leased, by another lessee)."""
        picks: list[_Pick] = []
        for row in conn.execute(query, {"now": now, "n": need + len(skipped)}).all():
            if row.id in skipped:
                continue
            fallback_open = row.fallback == "cpu" and (row.fallback_at or 0) <= now
            picked = pick_device(_requirements(row), caps, fallback_open=fallback_open)
            if picked is None:  # pragma: no cover - SQL and Python rule disagree
                continue
            picks.append(_Pick(row, picked[0], picked[1], uuid.uuid4().hex))
            if len(picks) == need:
                break
        return picks

    def _take(
        self, conn: Connection, worker_id: str, now: float, expires: float, picks: list[_Pick]
    ) -> dict[str, int]:
        """Lease the picked jobs to the worker and open their attempts; returns the attempt
        number of each job taken. Here every pick is taken: the caller's write transaction
        holds the only write lock (SQLite), so the candidates it read are still queued."""
        self._many.run(
            conn,
            _LEASE_JOB,
            [
                {
                    "b_id": p.row.id,
                    "b_token": p.token,
                    "b_device": p.device.torch_device,
                    "b_fallback": p.fallback_used,
                    "b_expires": expires,
                    "b_worker": worker_id,
                    "b_now": now,
                }
                for p in picks
            ],
        )
        self._many.run(
            conn,
            _INSERT_ATTEMPTS,
            [
                {
                    "job_id": p.row.id,
                    "attempt": p.row.attempts + 1,
                    "worker_id": worker_id,
                    "device": p.device.torch_device,
                    "lease_token": p.token,
                    "started_at": now,
                }
                for p in picks
            ],
        )
        self._touch(conn, worker_id, now)
        return {p.row.id: p.row.attempts + 1 for p in picks}

    def _touch_if_stale(
        self, conn: Connection, worker_id: str, now: float, older_than: float
    ) -> bool:
        """Mark the worker alive if its last contact is older than ``older_than`` seconds (or
        it was marked dead): one conditional UPDATE, no read first."""
        done = conn.execute(
            update(workers)
            .where(
                workers.c.id == worker_id,
                or_(
                    workers.c.last_seen < now - older_than,
                    workers.c.state.notin_(["active", "draining"]),
                ),
            )
            .values(
                last_seen=now,
                state=_ALIVE,
            )
        )
        if done.rowcount:
            return True
        if conn.execute(select(workers.c.id).where(workers.c.id == worker_id)).first() is None:
            raise NotFound(f"no worker with id {worker_id!r}: register again")
        return False

    def _touch(self, conn: Connection, worker_id: str, now: float) -> None:
        conn.execute(_TOUCH, {"b_worker": worker_id, "b_now": now})

    def heartbeat(
        self, worker_id: str, leases: Sequence[tuple[str, str]], *, lease_seconds: float
    ) -> HeartbeatResult:
        now = time.time()
        held: set[tuple[str, str]] = set()
        # Each statement is safe alone (the extension re-checks the fence itself), and a
        # heartbeat lost in a crash is sent again: a quick write.
        with self._quick() as conn:
            seen = conn.execute(
                update(workers)
                .where(workers.c.id == worker_id)
                .values(
                    last_seen=now,
                    state=_ALIVE,
                )
            )
            if seen.rowcount == 0:
                raise NotFound(f"no worker with id {worker_id!r}: register again")
            if not leases:
                return HeartbeatResult(lost=[])
            # Pairs, not a dict by job id: a worker may hold an old lease of a job (stopping
            # its child) and the job's new lease at once.
            wanted = set(leases)
            held = {
                (row.id, row.lease_token)
                for row in conn.execute(
                    select(jobs.c.id, jobs.c.lease_token).where(
                        jobs.c.id.in_(sorted({job_id for job_id, _ in wanted})),
                        jobs.c.state.in_(ACTIVE),
                    )
                )
            } & wanted
            if held:
                # Re-check the fence in the UPDATE itself: under READ COMMITTED another
                # gateway may have re-leased a job between the SELECT and here, and its new
                # holder's lease is not ours to extend. Tokens are unique per lease.
                conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(sorted(job_id for job_id, _ in held)),
                        jobs.c.state.in_(ACTIVE),
                        jobs.c.lease_token.in_(sorted(token for _, token in held)),
                    )
                    .values(lease_expires_at=now + lease_seconds)
                )
        return HeartbeatResult(lost=[pair for pair in leases if pair not in held])

    def report(self, outcomes: Sequence[Outcome]) -> list[ReportResult]:
        """Record outcomes in a handful of statements, however many there are.

        One read takes the fence facts of every reported job (locked on PostgreSQL), each
        outcome is judged in Python against its lease token and the state machine, and the
        accepted ones are written with one executemany per kind of change. Refused outcomes
        say why, as before: fencing stays exact.
        """
        if not outcomes:
            return []
        now = time.time()
        with self._write() as conn:
            ids = sorted({o.job_id for o in outcomes})
            current = {row.id: row for row in conn.execute(self._fences, {"b_ids": ids})}
            plan = _ReportPlan(self.retry, now)
            results = [plan.judge(outcome, current.get(outcome.job_id)) for outcome in outcomes]
            plan.write(conn, self._many)
            refused = [r for r in results if not r.accepted and r.reason is None]
            if refused:
                reasons = self._refusal_reasons(
                    conn, [o for o in outcomes if o.job_id in {r.job_id for r in refused}]
                )
                results = [
                    r if r.accepted or r.reason is not None else reasons[r.job_id] for r in results
                ]
            if plan.runnable:
                self._emit(conn, "runnable")
            if plan.finished:
                self._emit(conn, "finished")
        return results

    def _refusal_reasons(
        self, conn: Connection, outcomes: Sequence[Outcome]
    ) -> dict[str, ReportResult]:
        """Why each of ``outcomes`` was refused (the job was never leased with that token, or
        was leased again, or is already finished)."""
        reasons: dict[str, ReportResult] = {}
        for outcome in outcomes:
            row = conn.execute(
                select(jobs.c.state, jobs.c.lease_token).where(jobs.c.id == outcome.job_id)
            ).first()
            if row is None:
                reason = "no such job"
            elif row.lease_token != outcome.lease_token:
                issued = conn.execute(
                    select(attempts.c.attempt).where(
                        attempts.c.job_id == outcome.job_id,
                        attempts.c.lease_token == outcome.lease_token,
                    )
                ).first()
                reason = (
                    "lease lost: the job was leased again after this lease expired"
                    if issued is not None
                    else "unknown lease: this job was never leased with that token"
                )
            else:
                reason = f"lease lost: the job is already {row.state}"
            reasons[outcome.job_id] = ReportResult(
                job_id=outcome.job_id, accepted=False, reason=reason
            )
        return reasons

    def requeue_expired(self) -> int:
        return len(self.expire_leases())

    def expire_leases(self) -> list[ExpiredLease]:
        now = time.time()
        query = select(
            jobs.c.id,
            jobs.c.lost,
            jobs.c.worker_id,
            jobs.c.lease_token,
            jobs.c.state,
            jobs.c.function,
            jobs.c.gpu_kind,
            jobs.c.gpu_name,
        ).where(_in(jobs.c.state, ACTIVE), jobs.c.lease_expires_at < now)
        expired: list[ExpiredLease] = []
        with self._read() as conn:  # nearly always nothing: no write lock for that
            if not conn.execute(query.limit(1)).first():
                return expired
        with self._write() as conn:
            rows = conn.execute(self._lock(query)).all()
            if rows:
                self._emit(conn, "runnable")
            for row in rows:
                message = f"worker {row.worker_id} stopped heartbeating and its lease expired"
                decision = self.retry.after_lost_lease(row.lost + 1)
                event = Event.lose if decision.again else Event.give_up
                values: dict[str, Any] = {"state": target(event), "lost": jobs.c.lost + 1}
                if decision.again:
                    values.update(lease_token=None, run_after=now)
                    error = JobError(type="LeaseExpired", message=message, kind="lost")
                else:
                    values.update(finished_at=now)
                    error = JobError(
                        type="LeaseExpired", message=f"{message} ({decision.reason})", kind="lost"
                    )
                done = conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id == row.id,
                        jobs.c.lease_token == row.lease_token,
                        jobs.c.state.in_(sources(event)),
                    )
                    .values(error=_dumps(error.model_dump()), updated_at=now, **values)
                )
                conn.execute(
                    update(attempts)
                    .where(attempts.c.job_id == row.id, attempts.c.lease_token == row.lease_token)
                    .values(outcome="lost", finished_at=now, error=message)
                )
                if done.rowcount == 1:
                    expired.append(
                        ExpiredLease(
                            job_id=row.id,
                            function=row.function,
                            requirement=figures.requirement_of(row.gpu_kind, row.gpu_name),
                            worker_id=row.worker_id,
                            gave_up=not decision.again,
                        )
                    )
        return expired

    def _transition(
        self, job_id: str, event: Event, values: Callable[[float], dict[str, Any]]
    ) -> Job:
        now = time.time()
        with self._write() as conn:
            job_id = self._find_id(conn, job_id)
            done = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.in_(sources(event)))
                .values(state=target(event), updated_at=now, **values(now))
            )
            if done.rowcount == 1:
                self._emit(conn, "runnable" if target(event) == "queued" else "finished")
            if done.rowcount != 1:
                row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
                if row is None:
                    raise NotFound(f"no job with id {job_id!r}")
                raise InvalidTransition(f"job {job_id} is {row.state}: it cannot {event.value}")
        return self.get(job_id)

    def cancel(self, job_id: str) -> Job:
        # The lease token stays, so the worker's next heartbeat learns the job is gone and
        # kills it; any completion it sends is refused (the state is final).
        error = JobError(type="Cancelled", message="cancelled on request", kind="cancelled")
        job = self._transition(
            job_id,
            Event.cancel,
            lambda now: {"finished_at": now, "error": _dumps(error.model_dump())},
        )
        with self._write() as conn:  # the attempt that was running ends here too
            conn.execute(
                update(attempts)
                .where(attempts.c.job_id == job.id, attempts.c.outcome.is_(None))
                .values(outcome="cancelled", finished_at=time.time())
            )
        return self.get(job.id, history=job.history is not None)

    def rerun(self, job_id: str) -> Job:
        def fresh(now: float) -> dict[str, Any]:
            return {
                "failures": 0,
                "lost": 0,
                "lease_token": None,
                "worker_id": None,
                "error": None,
                "result": None,
                "finished_at": None,
                "run_after": now,
                "fallback_at": now + self.fallback_grace_s,
                "fallback_used": False,
            }

        return self._transition(job_id, Event.rerun, fresh)

    def requeue(self, job_id: str, *, delay_s: float = 0.0) -> Job:
        now = time.time()
        message = "taken back from its worker by an admin (requeue)"
        with self._write() as conn:
            job_id = self._find_id(conn, job_id)
            row = conn.execute(
                select(jobs.c.state, jobs.c.lease_token).where(jobs.c.id == job_id)
            ).first()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            # Fenced on the lease token too: a report that lands between the read and the
            # write wins, and the requeue is refused instead of undoing it.
            done = conn.execute(
                update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.state.in_(sources(Event.requeue)),
                    jobs.c.lease_token == row.lease_token,
                )
                .values(
                    state=target(Event.requeue),
                    # A fresh token on the next lease: the old holder's heartbeat hears the
                    # job is gone (and kills it), and its late report is refused.
                    lease_token=None,
                    worker_id=None,
                    run_after=now + max(0.0, delay_s),
                    updated_at=now,
                )
            )
            if done.rowcount != 1:
                raise InvalidTransition(
                    f"job {job_id} is {row.state}: only a leased or running job can be requeued"
                )
            conn.execute(
                update(attempts)
                .where(attempts.c.job_id == job_id, attempts.c.lease_token == row.lease_token)
                .values(outcome="requeued", finished_at=now, error=message)
            )
        return self.get(job_id)

    def prune(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        old = select(jobs.c.id).where(jobs.c.state.in_(TERMINAL), jobs.c.finished_at < cutoff)
        keeper = self._blobs()
        with self._write() as conn:
            conn.execute(delete(attempts).where(attempts.c.job_id.in_(old)))
            conn.execute(delete(job_inputs).where(job_inputs.c.job_id.in_(old)))
            done = conn.execute(
                delete(jobs).where(jobs.c.state.in_(TERMINAL), jobs.c.finished_at < cutoff)
            )
            # Blobs no remaining job needs, and old enough not to be an upload whose job is
            # about to be submitted.
            orphans = list(
                conn.execute(
                    select(blobs.c.digest).where(
                        blobs.c.created_at < cutoff,
                        blobs.c.digest.notin_(select(job_inputs.c.digest)),
                    )
                ).scalars()
            )
            if orphans:
                conn.execute(delete(blobs).where(blobs.c.digest.in_(orphans)))
                keeper.delete(conn, orphans)
        return int(done.rowcount or 0)

    # -- blobs ---------------------------------------------------------------------------
    def put_blob(self, digest: str, source: BinaryIO) -> BlobInfo:
        existing = self.blob_info(digest)
        if existing is not None:
            return existing
        keeper = self._blobs()
        now = time.time()
        try:
            with self._write() as conn:
                size = keeper.write(conn, digest, source)
                conn.execute(insert(blobs).values(digest=digest, size=size, created_at=now))
        except IntegrityError:  # another upload of the same bytes won the race
            pass
        found = self.blob_info(digest)
        assert found is not None
        return found

    def blob_info(self, digest: str) -> BlobInfo | None:
        with self._read() as conn:
            row = conn.execute(select(blobs).where(blobs.c.digest == digest)).first()
        return None if row is None else BlobInfo(row.digest, row.size, row.created_at)

    def read_blob(self, digest: str) -> Iterator[bytes]:
        if self.blob_info(digest) is None:
            raise NotFound(f"no blob {digest}: upload it first (PUT /v1/blobs/{digest})")
        keeper = self._blobs()
        with self._read(snapshot=True) as conn:
            yield from keeper.read(conn, digest)

    # -- figures (read-only) ---------------------------------------------------------------
    def queue_groups(self) -> list[QueueGroup]:
        with self._read() as conn:
            return figures.queue_groups(conn, time.time())

    def throughput(self, since: float, bucket_s: float) -> list[ThroughputBucket]:
        if bucket_s <= 0:
            raise InvalidInput("bucket_s must be positive")
        with self._read() as conn:
            return figures.throughput(conn, since, bucket_s, self._floor)

    def worker_load(self, since: float) -> list[WorkerLoad]:
        with self._read() as conn:
            return figures.worker_load(conn, since)

    def job_facts(self, job_ids: Sequence[str]) -> list[JobFacts]:
        with self._read() as conn:
            return figures.job_facts(conn, job_ids)

    # -- published functions ---------------------------------------------------------------
    def declarations(self, names: Sequence[str]) -> dict[str, FunctionOptions]:
        if not names:
            return {}
        with self._read() as conn:
            rows = conn.execute(
                select(functions.c.function, functions.c.options).where(
                    functions.c.function.in_(list(names))
                )
            ).all()
        return {
            r.function: FunctionOptions.model_validate_json(readable_json(r.options)) for r in rows
        }

    def pending(self, *, limit: int = 1000) -> list[Pending]:
        query = (
            select(jobs.c.id, jobs.c.function, jobs.c.requested)
            .where(jobs.c.resolved.is_(False), _in(jobs.c.state, ["queued"]))
            .order_by(jobs.c.created_at)
            .limit(limit)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            Pending(
                r.id, r.function, Requested.model_validate_json(readable_json(r.requested or "{}"))
            )
            for r in rows
        ]

    def resolve(self, settled: Sequence[tuple[str, Resolved | JobError]]) -> int:
        now = time.time()
        count = 0
        with self._write() as conn:
            for job_id, outcome in settled:
                pending = and_(jobs.c.id == job_id, jobs.c.resolved.is_(False))
                fence: Any
                if isinstance(outcome, JobError):
                    values: dict[str, Any] = {
                        "state": target(Event.reject),
                        "error": _dumps(outcome.model_dump()),
                        "finished_at": now,
                    }
                    fence = jobs.c.state.in_(sources(Event.reject))
                else:
                    values = {
                        **_option_columns(outcome),
                        "resolved": True,
                        "fallback_at": now + self.fallback_grace_s if outcome.fallback else None,
                    }
                    fence = jobs.c.state == JobState.queued.value
                done = conn.execute(
                    update(jobs).where(pending, fence).values(updated_at=now, **values)
                )
                count += done.rowcount or 0
            if count:
                self._emit(conn, "runnable")
        return count

    # -- workers -------------------------------------------------------------------------
    def register_worker(self, caps: Capabilities, worker_id: str | None = None) -> str:
        now = time.time()
        values = {
            "name": caps.name,
            "capabilities": caps.model_dump_json(),
            "last_seen": now,
            "state": "active",
        }
        with self._write() as conn:
            new_id = None
            if worker_id:
                done = conn.execute(
                    update(workers).where(workers.c.id == worker_id).values(**values)
                )
                if done.rowcount == 1:
                    new_id = worker_id
                    # Other gateways cache its capabilities for their lease polls.
                    self._emit(conn, f"worker:{worker_id}")
            if new_id is None:
                new_id = worker_id or uuid.uuid4().hex
                conn.execute(insert(workers).values(id=new_id, registered_at=now, **values))
            if caps.functions:
                rows = [
                    {
                        "function": path,
                        "module": path.partition(":")[0],
                        "options": options.model_dump_json(),
                        "worker_id": new_id,
                        "updated_at": now,
                    }
                    for path, options in sorted(caps.functions.items())
                ]
                conn.execute(self._upsert(functions, rows, "function"))
        return new_id

    def _to_worker(self, row: Any, now: float) -> WorkerInfo:
        alive = row.state in ("active", "draining") and row.last_seen >= now - self.worker_ttl_s
        return WorkerInfo(
            id=row.id,
            capabilities=Capabilities.model_validate_json(readable_json(row.capabilities)),
            registered_at=row.registered_at,
            last_seen=row.last_seen,
            state=row.state if alive or row.state not in ("active", "draining") else "lost",
            alive=alive,
        )

    def get_worker(self, worker_id: str) -> WorkerInfo:
        with self._read() as conn:
            row = conn.execute(select(workers).where(workers.c.id == worker_id)).first()
        if row is None:
            raise NotFound(f"no worker with id {worker_id!r}")
        return self._to_worker(row, time.time())

    def list_workers(self, *, alive_only: bool = False) -> list[WorkerInfo]:
        now = time.time()
        query = select(workers).order_by(workers.c.last_seen.desc())
        if alive_only:
            query = query.where(
                workers.c.state.in_(["active", "draining"]),
                workers.c.last_seen >= now - self.worker_ttl_s,
            )
        with self._read() as conn:
            return [self._to_worker(r, now) for r in conn.execute(query)]

    def drain_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            self._set_worker_state(conn, worker_id, "draining")
            self._emit(conn, f"drain:{worker_id}")

    def deregister_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            self._set_worker_state(conn, worker_id, "stopped")

    @staticmethod
    def _set_worker_state(conn: Connection, worker_id: str, state: str) -> None:
        done = conn.execute(update(workers).where(workers.c.id == worker_id).values(state=state))
        if done.rowcount == 0:
            raise NotFound(f"no worker with id {worker_id!r}")

    # -- tokens --------------------------------------------------------------------------
    def add_token(self, info: TokenInfo, token_hash: str) -> None:
        with self._write() as conn:
            conn.execute(
                insert(tokens).values(
                    id=info.id,
                    name=info.name,
                    scope=info.scope,
                    hash=token_hash,
                    created_at=info.created_at,
                    expires_at=info.expires_at,
                )
            )

    @staticmethod
    def _to_token(row: Any) -> TokenInfo:
        return TokenInfo.model_validate(row, from_attributes=True)

    def verify_token(self, token_hash: str) -> TokenInfo | None:
        with self._read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.hash == token_hash)).first()
        if row is None:
            return None
        info = self._to_token(row)
        return info if info.active(time.time()) else None

    def list_tokens(self) -> list[TokenInfo]:
        with self._read() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.created_at)).all()
        return [self._to_token(r) for r in rows]

    def revoke_token(self, token_id: str, *, force: bool = False) -> TokenInfo:
        now = time.time()
        active = and_(
            tokens.c.revoked_at.is_(None),
            or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now),
        )
        with self._write() as conn:
            # A prefix names an active token only: a typo must not hit a revoked or expired
            # one (or the wrong one among them); a whole id names any.
            token_id = self._find_id(
                conn, token_id, tokens.c.id, "active token", TOKEN_ID_LENGTH, among=active
            )
            row = conn.execute(
                self._for_update(select(tokens).where(tokens.c.id == token_id))
            ).first()
            if row is None:
                raise NotFound(f"no token with id {token_id!r}")
            if not force and row.scope == "admin" and self._to_token(row).active(now):
                others = conn.execute(
                    select(func.count()).where(
                        tokens.c.scope == "admin", tokens.c.id != token_id, active
                    )
                ).scalar_one()
                if not others:
                    raise LastAdminToken(
                        f"token {token_id} is the last active admin token: create another "
                        "admin token first, or revoke it with --force (a restarted gateway "
                        "then writes a new one to HOSTGPU_HOME/admin-token)"
                    )
            conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            self._emit(conn, "tokens")
            row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        return self._to_token(row)

    def has_active_admin(self) -> bool:
        now = time.time()
        with self._read() as conn:
            found = conn.execute(
                select(tokens.c.id)
                .where(
                    tokens.c.scope == "admin",
                    tokens.c.revoked_at.is_(None),
                    or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > now),
                )
                .limit(1)
            ).first()
        return found is not None


def _parse_cursor(cursor: str) -> tuple[float, str]:
    created, sep, job_id = cursor.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(created), job_id
    except ValueError:
        raise InvalidInput(
            f"bad cursor {cursor!r}: pass next_cursor from a previous page"
        ) from None


class _ReportPlan:
    """The writes one report makes, gathered so that each kind is one executemany."""

    def __init__(self, retry: RetryPolicy, now: float) -> None:
        self.retry = retry
        self.now = now
        self.started: list[dict[str, Any]] = []
        self.succeeded: list[dict[str, Any]] = []
        self.released: list[dict[str, Any]] = []
        self.retried: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.attempt_updates: list[dict[str, Any]] = []
        self.attempt_deletes: list[dict[str, Any]] = []
        self.runnable = False
        self.finished = False

    def judge(self, outcome: Outcome, row: Any) -> ReportResult:
        """Accept or refuse one outcome (reason filled in later for refusals)."""
        event = {
            "started": Event.start,
            "succeeded": Event.succeed,
            "released": Event.release,
            "failed": Event.fail,
        }[outcome.status]
        refused = ReportResult(job_id=outcome.job_id, accepted=False)
        if row is None or row.lease_token != outcome.lease_token:
            return refused
        if JobState(row.state) not in TRANSITIONS[event][0]:
            return refused
        # With the time every statement of the report binds: rows go to the driver as built.
        key = {"b_id": outcome.job_id, "b_token": outcome.lease_token, "b_now": self.now}
        if outcome.status == "started":
            self.started.append(key)
        elif outcome.status == "succeeded":
            self.succeeded.append(
                {
                    **key,
                    "b_result": _dumps(outcome.result),
                    "b_timings": _dumps(outcome.timings),
                    "b_device": outcome.device,
                }
            )
            self.attempt_updates.append({**key, "b_outcome": "succeeded", "b_error": None})
            self.finished = True
        elif outcome.status == "released":
            # Handed back unstarted or interrupted by a cold stop: not the job's fault,
            # so the attempt does not count.
            self.released.append(key)
            self.attempt_deletes.append(key)
            self.runnable = True
        else:
            error = outcome.error or JobError(type="Error", message="the job failed")
            decision = self.retry.after_failure(
                row.failures + 1, row.max_retries, retryable=outcome.retryable
            )
            failure: dict[str, Any] = {**key, "b_timings": _dumps(outcome.timings)}
            if decision.again:
                failure.update(
                    b_error=_dumps(error.model_dump()), b_run_after=self.now + decision.delay_s
                )
                self.retried.append(failure)
                self.runnable = True
            else:
                stored = error.model_copy(
                    update={"message": f"{error.message} ({decision.reason})"}
                )
                failure.update(b_error=_dumps(stored.model_dump()), b_finished=self.now)
                self.failed.append(failure)
                self.finished = True
            self.attempt_updates.append(
                {
                    **key,
                    "b_outcome": "retry" if decision.again else "failed",
                    "b_error": error.summary(),
                }
            )
            return ReportResult(
                job_id=outcome.job_id,
                accepted=True,
                retry_in_s=decision.delay_s if decision.again else None,
            )
        return ReportResult(job_id=outcome.job_id, accepted=True)

    def write(self, conn: Connection, many: Many) -> None:
        """One executemany per kind of change, each a statement built once."""
        for statement, rows in (
            (_START, self.started),
            (_SUCCEED, self.succeeded),
            (_RELEASE, self.released),
            (_RETRY, self.retried),
            (_FAIL, self.failed),
            (_CLOSE_ATTEMPT, self.attempt_updates),
            (_DROP_ATTEMPT, self.attempt_deletes),
        ):
            if rows:
                many.run(conn, statement, rows)


class _Pick(NamedTuple):
    """A lease candidate, the device it would run on, and the token its lease would carry."""

    row: Any
    device: Device
    fallback_used: bool
    token: str


class _RowView:
    """Attribute access over a dict, so freshly inserted rows convert like fetched ones."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
        for key in (
            "lease_token",
            "lease_expires_at",
            "worker_id",
            "device",
            "result",
            "error",
            "timings",
            "finished_at",
        ):
            self.__dict__.setdefault(key, None)
