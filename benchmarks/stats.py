"""The dashboard's and /metrics' figures with a long history: 100,000 jobs against 100.

    python benchmarks/stats.py [--jobs 100000] [--repeat 20] [--backends sqlite,postgres] [--plans]

Each figure the dashboard reads every few seconds, and Prometheus at each scrape, is timed
(median of ``--repeat`` calls) on a store holding ``--jobs`` jobs and, as the in-run
baseline, on one holding 100, with the same mix: 90 % finished over the last hour, 9 %
queued under four requirements, 1 % running on ten workers. The rows are written straight
into the tables (the lease/report path is ``dispatch.py``'s business), then the
database's statistics are gathered as autovacuum would. ``--plans`` prints PostgreSQL's
plan of each query.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import event, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch import fresh_pg_database

from hostgpu.capabilities import Capabilities, Device
from hostgpu.functions import FunctionOptions
from hostgpu.gateway.figures import ThroughputCache
from hostgpu.gateway.metrics import Metrics
from hostgpu.store import open_store
from hostgpu.store.schema import attempts, jobs
from hostgpu.store.sql import SQLStore

REQUIREMENTS = [("mps", None), ("cuda", "h100"), ("cpu", None), ("any", None)]
FUNCTIONS = ["bench.tasks:embed", "bench.tasks:render", "bench.tasks:ocr"]


def fill(store: SQLStore, n: int, workers: list[str]) -> None:
    rng = random.Random(7)
    now = time.time()
    job_rows: list[dict[str, Any]] = []
    attempt_rows: list[dict[str, Any]] = []
    for i in range(n):
        kind, name = REQUIREMENTS[i % len(REQUIREMENTS)]
        created = now - rng.uniform(0, 3600)
        row: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "function": FUNCTIONS[i % len(FUNCTIONS)],
            "module": "bench.tasks",
            "payload": '{"args":[1],"kwargs":{}}',
            "serializer": "json",
            "gpu_kind": kind,
            "gpu_name": name,
            "priority": 0,
            "timeout_s": 600.0,
            "max_retries": 2,
            "attempts": 0,
            "failures": 0,
            "lost": 0,
            "resolved": True,
            "fallback_used": False,
            "created_at": created,
            "updated_at": created,
            "run_after": created,
            # executemany wants the same keys in every row
            "worker_id": None,
            "device": None,
            "finished_at": None,
            "lease_token": None,
            "lease_expires_at": None,
        }
        share = i % 100
        if share < 90:  # finished
            leased = created + rng.uniform(0, 2)
            finished = min(now, leased + rng.uniform(0.1, 5))
            worker = workers[i % len(workers)]
            state = "failed" if share < 5 else "succeeded"
            row.update(
                state=state, attempts=1, worker_id=worker, device="cpu", finished_at=finished
            )
            attempt_rows.append(
                {
                    "job_id": row["id"],
                    "attempt": 1,
                    "worker_id": worker,
                    "device": "cpu",
                    "started_at": leased,
                    "finished_at": finished,
                    "outcome": state,
                }
            )
        elif share < 99:
            row.update(state="queued")
        else:
            worker = workers[i % len(workers)]
            row.update(
                state="running",
                attempts=1,
                worker_id=worker,
                device="cpu",
                lease_token=uuid.uuid4().hex,
                lease_expires_at=now + 3600,
            )
            attempt_rows.append(
                {
                    "job_id": row["id"],
                    "attempt": 1,
                    "worker_id": worker,
                    "device": "cpu",
                    "started_at": created,
                    "finished_at": None,
                    "outcome": None,
                }
            )
        job_rows.append(row)
    with store.engine.begin() as conn:
        for start in range(0, len(job_rows), 5000):
            conn.execute(insert(jobs), job_rows[start : start + 5000])
        for start in range(0, len(attempt_rows), 5000):
            conn.execute(insert(attempts), attempt_rows[start : start + 5000])
    with store.engine.connect() as conn:
        conn.execute(text("ANALYZE"))
        conn.commit()


def timed(action: Callable[[], object], repeat: int) -> float:
    action()  # warm caches and the connection pool
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def figures(store: SQLStore, metrics: Metrics) -> dict[str, Callable[[], object]]:
    with store.engine.connect() as conn:
        ids = [r[0] for r in conn.execute(text("SELECT id FROM jobs LIMIT 100"))]
    cache = ThroughputCache(store)
    return {
        "queue groups (/v1/stats/queues)": store.queue_groups,
        "throughput, 1 h by minute, uncached": lambda: store.throughput(time.time() - 3600, 60),
        "throughput, the gateway's cache warm": lambda: cache.get(
            (time.time() - 3600) // 60 * 60, 60
        ),
        "worker load, 5 min": lambda: store.worker_load(time.time() - 300),
        "job facts, 100 ids (per metrics flush)": lambda: store.job_facts(ids),
        "count by state (existing)": store.count_by_state,
        "whole /metrics scrape": lambda: (
            metrics.registry.collect() and list(metrics.registry.collect())
        ),
    }


def run_backend(url: str, n: int, repeat: int) -> dict[str, float]:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    try:
        caps = Capabilities(
            name="bench",
            devices=[Device(kind="cpu", name="cpu")],
            modules=["bench.tasks"],
            functions={f: FunctionOptions() for f in FUNCTIONS},
        )
        workers = [store.register_worker(caps) for _ in range(10)]
        fill(store, n, workers)
        metrics = Metrics(store)
        return {name: timed(action, repeat) for name, action in figures(store, metrics).items()}
    finally:
        store.close()


def pg_plans(url: str, n: int) -> None:
    store = open_store(url)
    assert isinstance(store, SQLStore)
    seen: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "jobs" in statement:
            seen.append((statement, parameters))

    try:
        workers = [
            store.register_worker(Capabilities(name="b", devices=[Device(kind="cpu", name="c")]))
            for _ in range(10)
        ]
        fill(store, n, workers)
        event.listen(store.engine, "before_cursor_execute", grab)
        for action in figures(store, Metrics(store)).values():
            action()
        event.remove(store.engine, "before_cursor_execute", grab)
        raw = store.engine.raw_connection()
        try:
            cursor = raw.cursor()
            done = set()
            for statement, parameters in seen:
                if statement in done:
                    continue
                done.add(statement)
                cursor.execute(f"EXPLAIN {statement}", parameters)
                print(statement.split("\n")[0][:90], "…")
                for (line,) in cursor.fetchall():
                    print("   ", line)
        finally:
            raw.close()
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--plans", action="store_true", help="print PostgreSQL's plans")
    args = parser.parse_args(argv)
    console = Console()
    if args.plans:
        pg_plans(fresh_pg_database(), args.jobs)
        return 0
    results: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    for backend in args.backends.split(","):
        console.print(f"running {backend}…")
        with tempfile.TemporaryDirectory() as tmp:

            def url(tag: str, tmp: str = tmp, backend: str = backend) -> str:
                if backend == "sqlite":
                    return f"sqlite:///{tmp}/{tag}.db"
                return fresh_pg_database()

            base = run_backend(url("base"), 100, args.repeat)
            deep = run_backend(url("deep"), args.jobs, args.repeat)
            results[backend] = (base, deep)
    table = Table(title=f"stats: median of {args.repeat} calls, {args.jobs:,} jobs vs 100")
    table.add_column("figure")
    for backend in results:
        table.add_column(f"{backend} ms", justify="right")
        table.add_column("× 100 jobs", justify="right")
    for name in next(iter(results.values()))[1]:
        cells = []
        for base, deep in results.values():
            cells += [f"{deep[name] * 1e3:.2f}", f"{deep[name] / base[name]:.1f}×"]
        table.add_row(name, *cells)
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
