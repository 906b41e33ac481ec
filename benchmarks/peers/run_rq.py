"""RQ driver for ``benchmarks/peers.py``; runs in ``.venv-peers``, prints JSON rows.

    .venv-peers/bin/python benchmarks/peers/run_rq.py --jobs 10000 --calls 200 \
        --workers 4 [--pool]

Starts ``--workers`` ``rq worker`` processes on Redis db 6 (flushed first). RQ's default
``Worker`` forks a work horse per job and runs one job at a time, so matching hostgpu's
2 workers × 2 children takes 4 RQ workers. With ``--pool`` also one
``rq worker-pool -n N`` (same fork-per-job workers, managed by one pool process), and with
``--simple`` N ``rq worker --worker-class rq.worker.SimpleWorker`` (jobs run in the worker
process itself, no fork: fast, but a crashing job takes the worker down); a row each.
Latency: ``--calls`` sequential ``enqueue`` + ``job.latest_result(timeout=...)`` (a blocking
read of the job's result stream). Throughput: ``Queue.enqueue_many`` in pipelined batches of
1,000, wait until the finished registry holds every job, then read every result.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import Fleet, bin_path, emit, redis_url, row
from redis import Redis
from rq import Queue
from rq.job import Job
from rq_tasks import noop

DB = 6
BATCH = 1000


def wait_workers(conn: Redis, fleet: Fleet, count: int, timeout: float = 60.0) -> None:
    from rq import Worker

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.check()
        if len(Worker.all(connection=conn)) >= count:
            return
        time.sleep(0.1)
    raise RuntimeError("rq workers did not register")


def start_workers(fleet: Fleet, kind: str, url: str, workers: int) -> str:
    """Start one configuration of RQ workers; return its description."""
    rq = bin_path("rq")
    if kind == "pool":
        argv = [rq, "worker-pool", "--url", url, "--logging-level", "WARNING"]
        fleet.start("rq-pool", [*argv, "--num-workers", str(workers), "default"])
        return f"rq worker-pool -n {workers}, fork per job"
    argv = [rq, "worker", "--url", url, "--logging_level", "WARNING"]
    if kind == "simple":
        argv += ["--worker-class", "rq.worker.SimpleWorker"]
    for n in range(workers):
        fleet.start(f"rq-{n}", [*argv, "default"])
    if kind == "simple":
        return f"{workers} × rq worker, SimpleWorker (no fork)"
    return f"{workers} × rq worker, fork per job"


def measure(queue: Queue, jobs: int, calls: int) -> tuple[float, list[float]]:
    conn = queue.connection
    job = queue.enqueue(noop, 0)  # warm every path once
    result = job.latest_result(timeout=30)
    assert result is not None and result.return_value == 0
    lat = []
    for i in range(calls):
        t = time.perf_counter()
        job = queue.enqueue(noop, i)
        result = job.latest_result(timeout=30)
        lat.append(time.perf_counter() - t)
        assert result is not None and result.return_value == i
    finished = queue.finished_job_registry
    before = finished.count
    started = time.perf_counter()
    ids: list[str] = []
    for start in range(0, jobs, BATCH):
        with conn.pipeline() as pipe:
            batch = queue.enqueue_many(
                [Queue.prepare_data(noop, (i,)) for i in range(start, min(jobs, start + BATCH))],
                pipeline=pipe,
            )
            pipe.execute()
        ids += [j.id for j in batch]
    deadline = time.monotonic() + 600
    while finished.count - before < jobs:
        if queue.failed_job_registry.count:
            raise RuntimeError("rq jobs failed")
        if time.monotonic() > deadline:
            raise RuntimeError("rq jobs did not finish")
        time.sleep(0.01)
    results = []
    for start in range(0, jobs, BATCH):
        fetched = Job.fetch_many(ids[start : start + BATCH], connection=conn)
        results += [j.return_value() if j else None for j in fetched]
    elapsed = time.perf_counter() - started
    assert results == list(range(jobs)), "rq results out of order or missing"
    return jobs / elapsed, lat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4, help="rq worker processes")
    parser.add_argument("--pool", action="store_true", help="also time rq worker-pool")
    parser.add_argument("--simple", action="store_true", help="also time SimpleWorker")
    args = parser.parse_args(argv)
    url = redis_url(DB)
    conn = Redis.from_url(url)
    rows = []
    setups = [("rq (worker)", "worker")]
    if args.pool:
        setups.append(("rq (worker-pool)", "pool"))
    if args.simple:
        setups.append(("rq (SimpleWorker)", "simple"))
    for name, kind in setups:
        conn.flushdb()
        with tempfile.TemporaryDirectory() as tmp:
            fleet = Fleet(Path(tmp))
            try:
                note = start_workers(fleet, kind, url, args.workers)
                wait_workers(conn, fleet, args.workers)
                rate, lat = measure(Queue("default", connection=conn), args.jobs, args.calls)
                rows.append(row(name, rate, lat, note))
            finally:
                fleet.stop()
    emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
