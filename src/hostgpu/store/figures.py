"""The store's read-only aggregates (dashboard, /metrics, /v1/stats), in SQLAlchemy Core.

Each query reads through an index so that its cost follows what it reports, not the
length of the history:

- queued jobs through the queue's partial index (``state = 'queued'``);
- jobs active now through the active-lease partial index;
- finished jobs through ``ix_jobs_finished`` (a range on ``finished_at``), joined to their
  last attempt by its primary key.

``tests/contract/test_query_plans.py`` checks the plans on SQLite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, and_, case, func, literal_column, select

from hostgpu.errors import InvalidInput
from hostgpu.jobs import ACTIVE_STATES, JobState, readable_json
from hostgpu.requirements import Requirements
from hostgpu.stats import JobFacts, QueueGroup, ThroughputBucket, WorkerLoad
from hostgpu.store.schema import attempts, jobs

ACTIVE = sorted(s.value for s in ACTIVE_STATES)
RAN = (JobState.succeeded.value, JobState.failed.value)


def _state_is(values: Sequence[str]) -> Any:
    """``state = 'x'`` / ``state IN ('x', 'y')`` with literals, so the planner can prove a
    partial index on the state applies (a bound parameter hides the value from it)."""
    if len(values) == 1:
        return jobs.c.state == literal_column(f"'{values[0]}'")
    return jobs.c.state.in_([literal_column(f"'{v}'") for v in values])


def _since(value: float) -> Any:
    """A time bound as a literal, not a parameter: PostgreSQL switches a statement it has run
    five times to a generic plan, which cannot know that ``finished_at >= <a minute ago>``
    selects a sliver of the table and reads all of it. (A finite float's repr is safe SQL.)"""
    number = float(value)
    if not math.isfinite(number):
        raise InvalidInput(f"not a time: {value!r}")
    return literal_column(repr(number))


def requirement_of(gpu_kind: str, gpu_name: str | None) -> str:
    return gpu_kind + (f":{gpu_name}" if gpu_name else "")


def queue_groups(conn: Connection, now: float) -> list[QueueGroup]:
    runnable = jobs.c.run_after <= now
    # A group is one kind of job: the same function with the same requirements.
    kind = (
        jobs.c.function,
        jobs.c.gpu_kind,
        jobs.c.gpu_name,
        jobs.c.min_memory_gb,
        jobs.c.labels,
        jobs.c.fallback,
        jobs.c.resolved,
    )
    query = (
        select(
            *kind,
            func.count().label("queued"),
            func.sum(case((runnable, 0), else_=1)).label("delayed"),
            func.min(jobs.c.created_at).label("oldest_created"),
            func.min(case((runnable, jobs.c.run_after), else_=None)).label("oldest_runnable"),
        )
        .where(_state_is([JobState.queued.value]))
        .group_by(*kind)
    )
    groups = []
    for row in conn.execute(query):
        groups.append(
            QueueGroup(
                function=row.function,
                requirements=Requirements(
                    gpu=requirement_of(row.gpu_kind, row.gpu_name),
                    min_memory_gb=row.min_memory_gb,
                    labels=json.loads(readable_json(row.labels)) if row.labels else {},
                ),
                fallback=row.fallback,
                resolved=bool(row.resolved),
                queued=row.queued,
                delayed=int(row.delayed or 0),
                oldest_created_at=row.oldest_created,
                oldest_runnable_at=row.oldest_runnable,
            )
        )
    groups.sort(key=lambda g: (g.oldest_runnable_at or g.oldest_created_at, g.function))
    return groups


def throughput(
    conn: Connection, since: float, bucket_s: float, floor: Callable[[Any], Any]
) -> list[ThroughputBucket]:
    # The job's last attempt: the one that finished it (absent for a job cancelled while
    # queued). Its lease time minus the job's run_after is the queue wait of the run that
    # counted; run_after is not touched between that lease and the finish.
    last = and_(attempts.c.job_id == jobs.c.id, attempts.c.attempt == jobs.c.attempts)
    ran = jobs.c.state.in_(RAN)
    wait = case((ran, attempts.c.started_at - jobs.c.run_after), else_=None)
    run = case((ran, jobs.c.finished_at - attempts.c.started_at), else_=None)
    index = floor((jobs.c.finished_at - _since(since)) / _since(bucket_s)).label("bucket")
    query = (
        select(
            index,
            func.sum(case((jobs.c.state == JobState.succeeded.value, 1), else_=0)).label("ok"),
            func.sum(case((jobs.c.state == JobState.failed.value, 1), else_=0)).label("bad"),
            func.sum(case((jobs.c.state == JobState.cancelled.value, 1), else_=0)).label("off"),
            func.avg(wait).label("wait_avg"),
            func.max(wait).label("wait_max"),
            func.avg(run).label("run_avg"),
        )
        .select_from(jobs.outerjoin(attempts, last))
        .where(jobs.c.finished_at >= _since(since))
        .group_by(index)
        .order_by(index)
    )
    buckets = []
    for row in conn.execute(query):
        buckets.append(
            ThroughputBucket(
                start=since + int(row.bucket) * bucket_s,
                succeeded=int(row.ok or 0),
                failed=int(row.bad or 0),
                cancelled=int(row.off or 0),
                wait_avg_s=_nonnegative(row.wait_avg),
                wait_max_s=_nonnegative(row.wait_max),
                run_avg_s=_nonnegative(row.run_avg),
            )
        )
    return buckets


def _nonnegative(value: float | None) -> float | None:
    # Clocks of several gateways differ by a little: never report a negative duration.
    return None if value is None else max(0.0, float(value))


def worker_load(conn: Connection, since: float) -> list[WorkerLoad]:
    loads: dict[str, WorkerLoad] = {}

    def load(worker_id: str) -> WorkerLoad:
        if worker_id not in loads:
            loads[worker_id] = WorkerLoad(worker_id=worker_id)
        return loads[worker_id]

    active = (
        select(jobs.c.worker_id, func.count().label("n"))
        .where(_state_is(ACTIVE), jobs.c.worker_id.is_not(None))
        .group_by(jobs.c.worker_id)
    )
    for row in conn.execute(active):
        load(row.worker_id).running = row.n
    finished = (
        select(jobs.c.worker_id, jobs.c.state, func.count().label("n"))
        .where(
            jobs.c.finished_at >= _since(since),
            jobs.c.worker_id.is_not(None),
            jobs.c.state.in_(RAN),
        )
        .group_by(jobs.c.worker_id, jobs.c.state)
    )
    for row in conn.execute(finished):
        if row.state == JobState.succeeded.value:
            load(row.worker_id).succeeded = row.n
        else:
            load(row.worker_id).failed = row.n
    return sorted(loads.values(), key=lambda w: w.worker_id)


def job_facts(conn: Connection, job_ids: Sequence[str]) -> list[JobFacts]:
    if not job_ids:
        return []
    last = and_(attempts.c.job_id == jobs.c.id, attempts.c.attempt == jobs.c.attempts)
    query = (
        select(
            jobs.c.id,
            jobs.c.function,
            jobs.c.gpu_kind,
            jobs.c.gpu_name,
            jobs.c.state,
            jobs.c.device,
            jobs.c.worker_id,
            jobs.c.fallback_used,
            jobs.c.run_after,
            jobs.c.finished_at,
            attempts.c.started_at,
        )
        .select_from(jobs.outerjoin(attempts, last))
        .where(jobs.c.id.in_(list(job_ids)))
    )
    return [
        JobFacts(
            id=row.id,
            function=row.function,
            requirement=requirement_of(row.gpu_kind, row.gpu_name),
            state=row.state,
            device=row.device,
            worker_id=row.worker_id,
            fallback_used=bool(row.fallback_used),
            run_after=row.run_after,
            leased_at=row.started_at,
            finished_at=row.finished_at,
        )
        for row in conn.execute(query)
    ]
