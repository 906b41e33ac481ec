"""Dispatch overhead: no-op jobs through hostgpu versus calling the function in-process.

    python benchmarks/dispatch.py [--jobs 10000] [--calls 200] [--workers 2]
                                  [--backends sqlite,postgres]

For each backend: a real gateway process and N real worker processes on 127.0.0.1;
``.map`` over ``--jobs`` no-op jobs (throughput) and ``--calls`` sequential ``.remote()``
round trips (latency p50/p99). The baseline is the same function called in this process,
in the same run, so the table shows ratios rather than absolute seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import hostgpu
from hostgpu.builtin import noop
from hostgpu.testing import Gateway, Worker

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def in_process(jobs: int, calls: int) -> dict[str, float]:
    started = time.perf_counter()
    for i in range(jobs):
        noop(i)
    rate = jobs / (time.perf_counter() - started)
    lat = []
    for i in range(calls):
        t = time.perf_counter()
        noop(i)
        lat.append(time.perf_counter() - t)
    return {"rate": rate, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def fresh_pg_database() -> str:
    import uuid

    import psycopg

    name = f"hostgpu_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_URL.rsplit("/", 1)[0] + f"/{name}"


def through_hostgpu(
    url: str, jobs: int, calls: int, workers: int, concurrency: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        gw = Gateway(home, url).start()
        fleet: list[Worker] = []
        try:
            fleet.extend(Worker(gw, concurrency=concurrency).start() for _ in range(workers))
            hostgpu.connect(gw.url, gw.token)
            noop.remote(0)  # warm every path once
            lat = []
            for i in range(calls):
                t = time.perf_counter()
                noop.remote(i)
                lat.append(time.perf_counter() - t)
            started = time.perf_counter()
            results = noop.map(range(jobs), batch_size=1000, progress=False)
            elapsed = time.perf_counter() - started
            assert results == list(range(jobs)), "results out of order or missing"
            return {
                "rate": jobs / elapsed,
                "p50": percentile(lat, 0.5),
                "p99": percentile(lat, 0.99),
            }
        finally:
            for w in fleet:
                w.stop()
            gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args(argv)
    console = Console()
    base = in_process(args.jobs, args.calls)
    rows = [("in-process call", base)]
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db" if backend == "sqlite" else fresh_pg_database()
            console.print(f"running {backend}…")
            rows.append(
                (
                    f"hostgpu ({backend})",
                    through_hostgpu(url, args.jobs, args.calls, args.workers, args.concurrency),
                )
            )
    table = Table(
        title=f"dispatch: {args.jobs} no-op jobs via .map, {args.calls} sequential "
        f".remote(); {args.workers} workers × {args.concurrency}"
    )
    for col in (
        "path",
        "jobs/s",
        "p50 ms",
        "p99 ms",
        "jobs/s vs target 1,000",
        "p50 vs target 10 ms",
    ):
        table.add_column(col, justify="right")
    for name, r in rows:
        table.add_row(
            name,
            f"{r['rate']:,.0f}",
            f"{r['p50'] * 1e3:.2f}",
            f"{r['p99'] * 1e3:.2f}",
            f"{r['rate'] / 1000:.2f}×" if name.startswith("hostgpu") else "",
            f"{10 / (r['p50'] * 1e3):.2f}×" if name.startswith("hostgpu") else "",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
