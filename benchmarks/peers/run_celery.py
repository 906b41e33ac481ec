"""Celery 5 driver for ``benchmarks/peers.py``; runs in ``.venv-peers``, prints JSON rows.

    .venv-peers/bin/python benchmarks/peers/run_celery.py --jobs 10000 --calls 200 \
        --workers 2 --concurrency 2 [--group]

Starts ``--workers`` ``celery worker --pool prefork --concurrency C`` processes (the shape
of hostgpu's N worker processes × C long-lived children), Redis broker and result backend
on db 5 (flushed first). Latency: ``--calls`` sequential ``noop.delay(i).get()``.
Throughput: ``--jobs`` ``noop.delay(i)``, then wait for every result (``ResultSet.get``);
with ``--group`` also ``group(noop.s(i) ...)``, one more row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis
from celery import group
from celery.result import ResultSet
from celery_tasks import app, noop
from common import REDIS_HOST, REDIS_PORT, Fleet, bin_path, emit, row

DB = 5


def wait_ready(fleet: Fleet, workers: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check()
        if len(app.control.ping(timeout=0.5)) >= workers:
            return
    raise RuntimeError("celery workers did not answer ping")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--group", action="store_true", help="also time group(...)")
    args = parser.parse_args(argv)
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=DB).flushdb()
    shape = f"{args.workers} × prefork {args.concurrency}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Fleet(Path(tmp))
        try:
            for n in range(args.workers):
                fleet.start(
                    f"celery-{n}",
                    [
                        bin_path("celery"),
                        "-A",
                        "celery_tasks",
                        "worker",
                        "--pool",
                        "prefork",
                        "--concurrency",
                        str(args.concurrency),
                        "--hostname",
                        f"bench{n}@%h",
                        "--loglevel",
                        "WARNING",
                    ],
                )
            wait_ready(fleet, args.workers)
            assert noop.delay(0).get(timeout=30) == 0  # warm every path once
            lat = []
            for i in range(args.calls):
                t = time.perf_counter()
                noop.delay(i).get(timeout=30)
                lat.append(time.perf_counter() - t)
            started = time.perf_counter()
            pending = [noop.delay(i) for i in range(args.jobs)]
            results = ResultSet(pending).get(timeout=600)
            elapsed = time.perf_counter() - started
            assert results == list(range(args.jobs)), "celery results out of order or missing"
            rows.append(row("celery (delay)", args.jobs / elapsed, lat, shape))
            if args.group:
                started = time.perf_counter()
                results = group(noop.s(i) for i in range(args.jobs)).apply_async().get(600)
                elapsed = time.perf_counter() - started
                assert results == list(range(args.jobs)), "celery group results wrong"
                rows.append(row("celery (group)", args.jobs / elapsed, lat, shape))
        finally:
            fleet.stop()
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
