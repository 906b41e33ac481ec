"""The hot queries use their indexes, so a deep queue does not slow leasing down.

SQLite only: its plans are deterministic without statistics, and SQLite's planner is the
one that once chose to read and sort every queued job on each lease. PostgreSQL's plans
depend on statistics; benchmarks/load.py measures both backends at 100,000 jobs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from hostgpu.capabilities import Capabilities, Device
from hostgpu.functions import FunctionOptions, Requested, resolve
from hostgpu.jobs import Payload
from hostgpu.store import NewJob, open_store
from hostgpu.store.sql import SQLStore


def new(gpu: str | None = None, payload: Payload | None = None) -> NewJob:
    asked = Requested(gpu=gpu)
    return NewJob("m:f", payload, resolve("m:f", None, asked), asked, resolved=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLStore]:
    s = open_store(f"sqlite:///{tmp_path / 'plans.db'}")
    assert isinstance(s, SQLStore)
    s.enqueue([new(payload=Payload(args=[i])) for i in range(2_000)])
    s.enqueue([new(gpu="mps") for _ in range(500)])
    yield s
    s.close()


def plan_of(store: SQLStore, marker: str, action: Any) -> str:
    """Run ``action`` and return SQLite's plan for its statement that contains ``marker``."""
    seen: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if marker in statement:
            seen.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        action()
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    assert seen, f"no statement containing {marker!r} ran"
    statement, parameters = seen[0]
    raw = store.engine.raw_connection()
    try:
        rows = raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
    finally:
        raw.close()
    return "\n".join(str(row[-1]) for row in rows)


def test_lease_reads_each_lane_through_its_index(store: SQLStore) -> None:
    """One index search per function lane, never a scan of the queue: each lane's
    own LIMIT stops it early, and only the few rows it yields are merged in order."""
    caps = Capabilities(
        name="w",
        devices=[Device(kind="cpu", name="cpu")],
        modules=["m"],
        functions={"m:f": FunctionOptions()},
    )
    worker = store.register_worker(caps)
    plan = plan_of(
        store,
        "AS lanes",
        lambda: store.lease(worker, caps, max_jobs=1, lease_seconds=30),
    )
    assert "SEARCH jobs USING INDEX ix_jobs_lane (function=?)" in plan, plan
    assert "SCAN jobs" not in plan, f"the lease scans the queue on every call:\n{plan}"


def test_requeue_expired_reads_only_active_jobs(store: SQLStore) -> None:
    plan = plan_of(store, "lease_expires_at <", store.requeue_expired)
    assert "ix_jobs_active_expiry" in plan, plan


def test_queue_figures_read_only_the_queued_jobs(store: SQLStore) -> None:
    plan = plan_of(store, "GROUP BY jobs.function", store.queue_groups)
    # The lane index is partial (queued jobs only): reading it reads no finished job.
    assert "USING INDEX ix_jobs_lane" in plan, plan


def test_throughput_reads_a_range_of_finished_jobs(store: SQLStore) -> None:
    plan = plan_of(store, "AS bucket", lambda: store.throughput(time.time() - 3600, 60))
    assert "ix_jobs_finished (finished_at>?)" in plan, plan
    assert "SCAN attempts" not in plan, plan


def test_worker_load_reads_active_and_recently_finished_jobs(store: SQLStore) -> None:
    since = time.time() - 60
    active = plan_of(store, "WHERE jobs.state IN", lambda: store.worker_load(since))
    assert "ix_jobs_active_expiry" in active, active
    finished = plan_of(store, "jobs.worker_id, jobs.state", lambda: store.worker_load(since))
    assert "ix_jobs_finished (finished_at>?)" in finished, finished
