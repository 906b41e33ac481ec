"""The store, written once in SQLAlchemy Core; the backends differ only in how they lock.

SQLite serialises writers with ``BEGIN IMMEDIATE``; PostgreSQL lets several
gateways lease at once with ``SELECT … FOR UPDATE SKIP LOCKED``. Everything else
(fencing, retries, idempotency) is the same SQL on both.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Engine,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from hostgpu.capabilities import Capabilities
from hostgpu.errors import DuplicateKey, InvalidTransition, NotFound
from hostgpu.jobs import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Attempt,
    Job,
    JobSpec,
    JobState,
    Lease,
    Outcome,
    Requirements,
)
from hostgpu.routing import GIB, SATISFIES, canonical_labels, label_subsets, pick_device
from hostgpu.store.interface import (
    HeartbeatResult,
    ReportResult,
    Scope,
    Store,
    TokenInfo,
    WorkerRecord,
)
from hostgpu.store.schema import attempts, jobs, tokens, workers

ACTIVE = [s.value for s in ACTIVE_STATES]
TERMINAL = [s.value for s in TERMINAL_STATES]
MIGRATIONS = Path(__file__).parent / "migrations"


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def _dt_opt(ts: float | None) -> datetime | None:
    return None if ts is None else _dt(ts)


def hash_token(secret: str) -> str:
    # Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and lookups by hash stay a single indexed read.
    return hashlib.sha256(secret.encode()).hexdigest()


class SQLStore(Store):
    """Shared implementation; subclasses provide the engine and the lease lock."""

    def __init__(
        self,
        url: str,
        *,
        retry_base_s: float = 1.0,
        retry_max_s: float = 300.0,
        fallback_grace_s: float = 30.0,
        worker_ttl_s: float = 30.0,
    ) -> None:
        self.url = url
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.fallback_grace_s = fallback_grace_s
        self.worker_ttl_s = worker_ttl_s
        self.engine = self._create_engine(url)
        self._migrate()

    # -- backend hooks ------------------------------------------------------------------
    def _create_engine(self, url: str) -> Engine:
        raise NotImplementedError

    def _lock(self, query: Select[Any]) -> Select[Any]:
        """Make a lease/requeue SELECT safe against concurrent lessees."""
        return query

    def _migration_lock(self, conn: Connection) -> None:
        """Serialise concurrent migrations (several gateways starting together)."""

    def _before_lease(self, conn: Connection) -> None:
        """Backend tuning for the lease SELECT, inside its transaction."""

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

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
            id=row.id,
            function=row.function,
            payload=_loads(row.payload),
            serializer=row.serializer,
            requirements=Requirements(
                gpu=row.gpu_kind + (f":{row.gpu_name}" if row.gpu_name else ""),
                min_memory_gb=row.min_memory_gb,
                labels=_loads(row.labels) or {},
            ),
            fallback=row.fallback,
            priority=row.priority,
            timeout_s=row.timeout_s,
            max_retries=row.max_retries,
            idempotency_key=row.idempotency_key,
            state=JobState(row.state),
            attempts=row.attempts,
            worker_id=row.worker_id,
            device=row.device,
            fallback_used=bool(row.fallback_used),
            result=_loads(row.result),
            error=_loads(row.error),
            timings=_loads(row.timings),
            created_at=_dt(row.created_at),
            updated_at=_dt(row.updated_at),
            run_after=_dt(row.run_after),
            finished_at=_dt_opt(row.finished_at),
            history=history,
        )

    def _backoff(self, attempt: int) -> float:
        # Exponential with full jitter, so a burst of failures does not retry in lockstep.
        ceiling = min(self.retry_max_s, self.retry_base_s * 2 ** max(attempt - 1, 0))
        return random.uniform(ceiling / 2, ceiling)

    # -- jobs ----------------------------------------------------------------------------
    def enqueue(self, specs: Sequence[JobSpec]) -> list[Job]:
        try:
            return self._enqueue(specs)
        except IntegrityError:
            # Another gateway inserted the same idempotency key between our read and
            # our insert: the second pass finds its job.
            try:
                return self._enqueue(specs)
            except IntegrityError as exc:  # pragma: no cover - needs a three-way race
                raise DuplicateKey("idempotency key conflict; retry the request") from exc

    def _enqueue(self, specs: Sequence[JobSpec]) -> list[Job]:
        now = time.time()
        keys = [s.idempotency_key for s in specs if s.idempotency_key]
        with self._write() as conn:
            existing: dict[str, Any] = {}
            row: Any
            if keys:
                for row in conn.execute(select(jobs).where(jobs.c.idempotency_key.in_(keys))):
                    existing[row.idempotency_key] = row
            new_rows: list[dict[str, Any]] = []
            order: list[str | dict[str, Any]] = []
            batch_keys: dict[str, dict[str, Any]] = {}
            for spec in specs:
                key = spec.idempotency_key
                if key and key in existing:
                    order.append(key)
                    continue
                if key and key in batch_keys:
                    order.append(batch_keys[key])
                    continue
                req = spec.requirements
                row = {
                    "id": uuid.uuid4().hex,
                    "function": spec.function,
                    "module": spec.module,
                    "payload": _dumps(spec.payload),
                    "serializer": spec.serializer,
                    "gpu_kind": req.kind,
                    "gpu_name": req.name,
                    "min_memory_gb": req.min_memory_gb,
                    "labels": canonical_labels(req.labels),
                    "fallback": spec.fallback,
                    "fallback_at": now + self.fallback_grace_s if spec.fallback else None,
                    "priority": spec.priority,
                    "timeout_s": spec.timeout_s,
                    "max_retries": spec.max_retries,
                    "idempotency_key": key,
                    "state": JobState.queued.value,
                    "attempts": 0,
                    "fallback_used": False,
                    "created_at": now,
                    "updated_at": now,
                    "run_after": now,
                }
                new_rows.append(row)
                order.append(row)
                if key:
                    batch_keys[key] = row
            if new_rows:
                conn.execute(insert(jobs), new_rows)
        out = []
        for item in order:
            if isinstance(item, str):
                out.append(self._to_job(existing[item]))
            else:
                out.append(self._to_job(_RowView(item)))
        return out

    def get(self, job_id: str, *, history: bool = False) -> Job:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
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
        query = select(jobs).where(jobs.c.id.in_(list(job_ids)))
        if terminal_only:
            query = query.where(jobs.c.state.in_(TERMINAL))
        with self._read() as conn:
            return [self._to_job(r) for r in conn.execute(query)]

    def list_jobs(
        self, *, state: JobState | None = None, limit: int = 100, before: float | None = None
    ) -> list[Job]:
        query = select(jobs).order_by(jobs.c.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if before is not None:
            query = query.where(jobs.c.created_at < before)
        with self._read() as conn:
            return [self._to_job(r) for r in conn.execute(query)]

    def count_by_state(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        with self._read() as conn:
            for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)):
                counts[state] = n
        return counts

    # -- leasing -------------------------------------------------------------------------
    def _match_clause(self, caps: Capabilities, now: float) -> Any:
        """The SQL form of :func:`hostgpu.routing.pick_device` (kept in step with it)."""
        options = []
        for device in caps.devices:
            memory_gb = (device.memory_bytes or 0) / GIB
            options.append(
                and_(
                    jobs.c.gpu_kind.in_(SATISFIES[device.kind]),
                    or_(
                        jobs.c.gpu_name.is_(None),
                        literal(device.name.lower()).contains(jobs.c.gpu_name),
                    ),
                    or_(jobs.c.min_memory_gb.is_(None), jobs.c.min_memory_gb <= memory_gb),
                )
            )
        if any(d.kind == "cpu" for d in caps.devices):
            options.append(and_(jobs.c.fallback == "cpu", jobs.c.fallback_at <= now))
        if not options:
            return literal(False)
        if caps.labels:
            labels = or_(jobs.c.labels.is_(None), jobs.c.labels.in_(label_subsets(caps.labels)))
        else:
            labels = jobs.c.labels.is_(None)
        return and_(or_(*options), labels)

    def lease(
        self, worker_id: str, caps: Capabilities, *, max_jobs: int, lease_seconds: float
    ) -> list[Lease]:
        if max_jobs <= 0 or not caps.modules:
            return []
        now = time.time()
        query = (
            select(
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
            )
            .where(
                # A literal, not a bound parameter: only then can SQLite (and a generic
                # PostgreSQL plan) prove the partial queue index applies, instead of
                # sorting every queued job on each lease.
                jobs.c.state == literal_column("'queued'"),
                jobs.c.run_after <= now,
                jobs.c.module.in_(caps.modules),
                self._match_clause(caps, now),
            )
            .order_by(jobs.c.priority.desc(), jobs.c.run_after, jobs.c.created_at)
            .limit(max_jobs)
        )
        expires = now + lease_seconds
        leases: list[Lease] = []
        with self._write() as conn:
            self._before_lease(conn)
            rows = conn.execute(self._lock(query)).all()
            if not rows:
                return []
            updates = []
            attempt_rows = []
            for row in rows:
                req = Requirements(
                    gpu=row.gpu_kind + (f":{row.gpu_name}" if row.gpu_name else ""),
                    min_memory_gb=row.min_memory_gb,
                    labels=_loads(row.labels) or {},
                )
                fallback_open = row.fallback == "cpu" and (row.fallback_at or 0) <= now
                picked = pick_device(req, caps, fallback_open=fallback_open)
                if picked is None:  # pragma: no cover - SQL and Python rule disagree
                    continue
                device, fallback_used = picked
                token = uuid.uuid4().hex
                attempt = row.attempts + 1
                updates.append(
                    {
                        "b_id": row.id,
                        "b_token": token,
                        "b_device": device.torch_device,
                        "b_fallback": fallback_used,
                    }
                )
                attempt_rows.append(
                    {
                        "job_id": row.id,
                        "attempt": attempt,
                        "worker_id": worker_id,
                        "device": device.torch_device,
                        "lease_token": token,
                        "started_at": now,
                    }
                )
                leases.append(
                    Lease(
                        job_id=row.id,
                        lease_token=token,
                        attempt=attempt,
                        function=row.function,
                        payload=_loads(row.payload),
                        serializer=row.serializer,
                        timeout_s=row.timeout_s,
                        device=device,
                        fallback_used=fallback_used,
                        lease_expires_at=_dt(expires),
                    )
                )
            if updates:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == bindparam("b_id"))
                    .values(
                        state=JobState.leased.value,
                        lease_token=bindparam("b_token"),
                        lease_expires_at=expires,
                        worker_id=worker_id,
                        device=bindparam("b_device"),
                        fallback_used=bindparam("b_fallback"),
                        attempts=jobs.c.attempts + 1,
                        updated_at=now,
                    ),
                    updates,
                )
                conn.execute(insert(attempts), attempt_rows)
        return leases

    def heartbeat(
        self, worker_id: str, leases: Sequence[tuple[str, str]], *, lease_seconds: float
    ) -> HeartbeatResult:
        now = time.time()
        with self._write() as conn:
            seen = conn.execute(
                update(workers)
                .where(workers.c.id == worker_id)
                .values(last_seen=now, state="active")
            )
            if seen.rowcount == 0:
                raise NotFound(f"no worker with id {worker_id!r}: register again")
            if not leases:
                return HeartbeatResult(lost=[])
            wanted = dict(leases)
            held = [
                row.id
                for row in conn.execute(
                    select(jobs.c.id, jobs.c.lease_token).where(
                        jobs.c.id.in_(list(wanted)), jobs.c.state.in_(ACTIVE)
                    )
                )
                if row.lease_token == wanted[row.id]
            ]
            if held:
                # Re-check the fence in the UPDATE itself: under READ COMMITTED another
                # gateway may have re-leased a job between the SELECT and here, and its new
                # holder's lease is not ours to extend. Tokens are unique per lease.
                conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(held),
                        jobs.c.state.in_(ACTIVE),
                        jobs.c.lease_token.in_([wanted[job_id] for job_id in held]),
                    )
                    .values(lease_expires_at=now + lease_seconds)
                )
        held_set = set(held)
        return HeartbeatResult(lost=[job_id for job_id in wanted if job_id not in held_set])

    def report(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[ReportResult]:
        now = time.time()
        results: list[ReportResult] = []
        with self._write() as conn:
            for outcome in outcomes:
                results.append(self._report_one(conn, outcome, now))
        return results

    def _refusal(self, conn: Connection, outcome: Outcome) -> ReportResult:
        row = conn.execute(
            select(jobs.c.state, jobs.c.lease_token).where(jobs.c.id == outcome.job_id)
        ).first()
        if row is None:
            reason = "no such job"
        elif row.lease_token != outcome.lease_token:
            reason = "lease lost: the job was leased again after this lease expired"
        else:
            reason = f"lease lost: the job is already {row.state}"
        return ReportResult(outcome.job_id, False, reason)

    def _report_one(self, conn: Connection, outcome: Outcome, now: float) -> ReportResult:
        fenced = and_(
            jobs.c.id == outcome.job_id,
            jobs.c.lease_token == outcome.lease_token,
            jobs.c.state.in_(ACTIVE),
        )
        attempt_of = and_(
            attempts.c.job_id == outcome.job_id, attempts.c.lease_token == outcome.lease_token
        )
        if outcome.status == "started":
            done = conn.execute(
                update(jobs).where(fenced).values(state=JobState.running.value, updated_at=now)
            )
            if done.rowcount != 1:
                return self._refusal(conn, outcome)
            return ReportResult(outcome.job_id, True)
        if outcome.status == "succeeded":
            values: dict[str, Any] = {
                "state": JobState.succeeded.value,
                "result": _dumps(outcome.result),
                "error": None,
                "timings": _dumps(outcome.timings),
                "finished_at": now,
                "updated_at": now,
            }
            if outcome.device:
                values["device"] = outcome.device
            done = conn.execute(update(jobs).where(fenced).values(**values))
            if done.rowcount != 1:
                return self._refusal(conn, outcome)
            conn.execute(
                update(attempts).where(attempt_of).values(outcome="succeeded", finished_at=now)
            )
            return ReportResult(outcome.job_id, True)
        row = conn.execute(select(jobs.c.attempts, jobs.c.max_retries).where(fenced)).first()
        if row is None:
            return self._refusal(conn, outcome)
        if outcome.status == "released":
            # Handed back unstarted or interrupted by a cold stop: not the job's fault,
            # so the attempt does not count.
            conn.execute(
                update(jobs)
                .where(fenced)
                .values(
                    state=JobState.queued.value,
                    attempts=jobs.c.attempts - 1,
                    lease_token=None,
                    worker_id=None,
                    run_after=now,
                    updated_at=now,
                )
            )
            conn.execute(delete(attempts).where(attempt_of))
            return ReportResult(outcome.job_id, True)
        error = outcome.error or {"type": "Error", "message": "the job failed"}
        message = f"{error.get('type', 'Error')}: {error.get('message', '')}"[:2000]
        retry = outcome.retryable and row.attempts <= row.max_retries
        values = {"error": _dumps(error), "timings": _dumps(outcome.timings), "updated_at": now}
        if retry:
            values.update(
                state=JobState.queued.value,
                lease_token=None,
                run_after=now + self._backoff(row.attempts),
            )
        else:
            values.update(state=JobState.failed.value, finished_at=now)
        conn.execute(update(jobs).where(fenced).values(**values))
        conn.execute(
            update(attempts)
            .where(attempt_of)
            .values(outcome="retry" if retry else "failed", finished_at=now, error=message)
        )
        return ReportResult(outcome.job_id, True)

    def requeue_expired(self) -> int:
        now = time.time()
        query = select(
            jobs.c.id, jobs.c.attempts, jobs.c.max_retries, jobs.c.worker_id, jobs.c.lease_token
        ).where(
            # Literals, so the partial index over active jobs provably applies.
            jobs.c.state.in_([literal_column(f"'{state}'") for state in sorted(ACTIVE)]),
            jobs.c.lease_expires_at < now,
        )
        with self._write() as conn:
            rows = conn.execute(self._lock(query)).all()
            for row in rows:
                message = f"worker {row.worker_id} stopped heartbeating and its lease expired"
                error = {"type": "LeaseExpired", "message": message, "kind": "lost"}
                fenced = and_(jobs.c.id == row.id, jobs.c.lease_token == row.lease_token)
                if row.attempts <= row.max_retries:
                    values: dict[str, Any] = {
                        "state": JobState.queued.value,
                        "lease_token": None,
                        "run_after": now,
                    }
                else:
                    values = {"state": JobState.failed.value, "finished_at": now}
                conn.execute(
                    update(jobs).where(fenced).values(error=_dumps(error), updated_at=now, **values)
                )
                conn.execute(
                    update(attempts)
                    .where(attempts.c.job_id == row.id, attempts.c.lease_token == row.lease_token)
                    .values(outcome="lost", finished_at=now, error=message)
                )
        return len(rows)

    def cancel(self, job_id: str) -> Job:
        now = time.time()
        with self._write() as conn:
            row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}")
            if row.state in TERMINAL:
                raise InvalidTransition(f"job {job_id} is already {row.state}")
            # The lease token stays, so the worker's next heartbeat learns the job is
            # gone and kills it; any completion it sends is refused (state is final).
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state.notin_(TERMINAL))
                .values(
                    state=JobState.cancelled.value,
                    finished_at=now,
                    updated_at=now,
                    error=_dumps({"type": "Cancelled", "message": "cancelled on request"}),
                )
            )
        return self.get(job_id)

    def prune(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        old = select(jobs.c.id).where(jobs.c.state.in_(TERMINAL), jobs.c.finished_at < cutoff)
        with self._write() as conn:
            conn.execute(delete(attempts).where(attempts.c.job_id.in_(old)))
            done = conn.execute(
                delete(jobs).where(jobs.c.state.in_(TERMINAL), jobs.c.finished_at < cutoff)
            )
        return int(done.rowcount or 0)

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
            if worker_id:
                done = conn.execute(
                    update(workers).where(workers.c.id == worker_id).values(**values)
                )
                if done.rowcount == 1:
                    return worker_id
            new_id = worker_id or uuid.uuid4().hex
            conn.execute(insert(workers).values(id=new_id, registered_at=now, **values))
        return new_id

    def _to_worker(self, row: Any, now: float) -> WorkerRecord:
        alive = row.state == "active" and row.last_seen >= now - self.worker_ttl_s
        return WorkerRecord(
            id=row.id,
            capabilities=Capabilities.model_validate_json(row.capabilities),
            registered_at=row.registered_at,
            last_seen=row.last_seen,
            state=row.state if alive or row.state != "active" else "lost",
            alive=alive,
        )

    def get_worker(self, worker_id: str) -> WorkerRecord:
        with self._read() as conn:
            row = conn.execute(select(workers).where(workers.c.id == worker_id)).first()
        if row is None:
            raise NotFound(f"no worker with id {worker_id!r}")
        return self._to_worker(row, time.time())

    def list_workers(self, *, alive_only: bool = False) -> list[WorkerRecord]:
        now = time.time()
        query = select(workers).order_by(workers.c.last_seen.desc())
        if alive_only:
            query = query.where(
                workers.c.state == "active", workers.c.last_seen >= now - self.worker_ttl_s
            )
        with self._read() as conn:
            return [self._to_worker(r, now) for r in conn.execute(query)]

    def deregister_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute(update(workers).where(workers.c.id == worker_id).values(state="stopped"))

    # -- tokens --------------------------------------------------------------------------
    def create_token(
        self, name: str, scope: Scope, *, secret: str | None = None
    ) -> tuple[TokenInfo, str]:
        secret = secret or f"hg{scope[0]}_{secrets.token_urlsafe(32)}"
        info = TokenInfo(id=uuid.uuid4().hex[:16], name=name, scope=scope, created_at=time.time())
        with self._write() as conn:
            conn.execute(
                insert(tokens).values(
                    id=info.id,
                    name=name,
                    scope=scope,
                    hash=hash_token(secret),
                    created_at=info.created_at,
                )
            )
        return info, secret

    @staticmethod
    def _to_token(row: Any) -> TokenInfo:
        return TokenInfo(
            id=row.id,
            name=row.name,
            scope=row.scope,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )

    def verify_token(self, secret: str) -> TokenInfo | None:
        digest = hash_token(secret)
        with self._read() as conn:
            row = conn.execute(select(tokens).where(tokens.c.hash == digest)).first()
        if row is None or row.revoked_at is not None:
            return None
        if not hmac.compare_digest(row.hash, digest):  # pragma: no cover - belt and braces
            return None
        return self._to_token(row)

    def list_tokens(self) -> list[TokenInfo]:
        with self._read() as conn:
            rows = conn.execute(select(tokens).order_by(tokens.c.created_at)).all()
        return [self._to_token(r) for r in rows]

    def revoke_token(self, token_id: str) -> TokenInfo:
        with self._write() as conn:
            done = conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = conn.execute(select(tokens).where(tokens.c.id == token_id)).first()
        if row is None:
            raise NotFound(f"no token with id {token_id!r}")
        del done
        return self._to_token(row)


class _RowView:
    """Attribute access over a dict, so freshly inserted rows convert like fetched ones."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.__dict__.update(data)
        self.__dict__.setdefault("lease_token", None)
        for key in ("lease_expires_at", "worker_id", "device", "result", "error", "timings"):
            self.__dict__.setdefault(key, None)
        self.__dict__.setdefault("finished_at", None)
