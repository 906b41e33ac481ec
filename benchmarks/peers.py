"""Dispatch against the peers: hostgpu (SQLite, PostgreSQL), Celery 5, RQ and Ray, one run.

    .venv/bin/python benchmarks/peers.py [--jobs 10000] [--calls 200] [--workers 2]
        [--concurrency 2] [--only hostgpu-sqlite,hostgpu-postgres,celery,rq,ray]
        [--rounds 1] [--no-extras] [--json PATH]

Same machine, same no-op task, same number of concurrent job slots (``--workers`` ×
``--concurrency``), in one run:

- hostgpu: ``through_hostgpu`` from ``benchmarks/dispatch.py`` (a real gateway and
  ``--workers`` worker processes, each with ``--concurrency`` long-lived spawned children);
  throughput is ``noop.map`` over ``--jobs`` items, latency ``--calls`` sequential
  ``noop.remote()``.
- Celery 5: ``--workers`` ``celery worker --pool prefork --concurrency C`` (the same shape:
  N parents × C long-lived children), Redis broker and result backend (db 5, flushed).
  Throughput: ``--jobs`` ``noop.delay(i)`` then every result; extra row: ``group(...)``.
- RQ: ``--workers × --concurrency`` ``rq worker`` processes (each runs one job at a time
  and forks a work horse per job), Redis db 6 (flushed). Throughput: ``enqueue_many``,
  wait for the finished registry, read every result; latency: ``enqueue`` and a blocking
  ``latest_result``. Extra rows: ``rq worker-pool`` and ``SimpleWorker`` (no fork).
- Ray: a local ``ray.init`` with ``--workers × --concurrency`` CPUs bound to 127.0.0.1, the
  same no-op as an ``@ray.remote`` task; throughput ``ray.get`` of ``--jobs`` tasks, latency
  ``--calls`` sequential ``ray.get(f.remote(i))`` (in a subprocess, so Ray's threads and
  processes go with it).

``--rounds N`` runs every system N times, interleaved (a, b, c, a, b, c, …), and reports
each one's medians: this machine is shared, and interleaving spreads its noise evenly.

Celery and RQ run from ``.venv-peers`` (``scripts/peers-venv``; Celery pins
python-dateutil against chromadb), through ``benchmarks/peers/run_*.py``, which print one
JSON line per row. The table gives hostgpu (SQLite)'s ratio to each row: throughput
hostgpu/peer and latency peer p50/hostgpu p50 (above 1× means hostgpu is ahead).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dispatch import fresh_pg_database, through_hostgpu
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SYSTEMS = ("hostgpu-sqlite", "hostgpu-postgres", "celery", "rq", "ray")
RAY_DRIVER = """
import json, sys, time
import ray
jobs, calls, cpus = (int(a) for a in sys.argv[1:4])
ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
         log_to_driver=False)
@ray.remote
def noop(x=None):
    return x
ray.get([noop.remote(i) for i in range(200)])  # start the workers, warm every path
lat = []
for i in range(calls):
    t = time.perf_counter(); ray.get(noop.remote(i)); lat.append(time.perf_counter() - t)
t = time.perf_counter()
assert ray.get([noop.remote(i) for i in range(jobs)]) == list(range(jobs))
rate = jobs / (time.perf_counter() - t)
lat.sort()
print(json.dumps({"name": "ray (local)", "rate": rate, "p50": lat[len(lat) // 2],
                  "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
                  "note": f"ray.init, {cpus} CPUs, @ray.remote no-op"}))
ray.shutdown()
"""


def ensure_peers_venv() -> None:
    """Create or update ``.venv-peers`` (idempotent; a no-op when its stamp is current)."""
    subprocess.run([str(ROOT / "scripts" / "peers-venv")], check=True, cwd=ROOT)


def run_peer(script: str, *args: str) -> list[dict[str, Any]]:
    """Run a driver in ``.venv-peers``; its stdout is one JSON row per line."""
    out = subprocess.run(
        [str(PEERS_PYTHON), str(PEERS / script), *args],
        check=True,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def hostgpu_row(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db" if backend == "sqlite" else fresh_pg_database()
        r = through_hostgpu(url, args.jobs, args.calls, args.workers, args.concurrency)
    shape = f"{args.workers} × {args.concurrency} spawned children"
    return {"name": f"hostgpu ({backend})", "note": shape, **r}


def ray_row(args: argparse.Namespace) -> list[dict[str, Any]]:
    cpus = str(args.workers * args.concurrency)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run(
        [sys.executable, "-c", RAY_DRIVER, str(args.jobs), str(args.calls), cpus],
        check=True,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def medians(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per name: the median rate and latencies over the rounds."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rows in rounds:
        for r in rows:
            by_name.setdefault(r["name"], []).append(r)
    out = []
    for rs in by_name.values():
        row = dict(rs[0])
        for key in ("rate", "p50", "p99"):
            row[key] = statistics.median(r[key] for r in rs)
        row["rounds"] = len(rs)
        out.append(row)
    return out


def ratios(ref: dict[str, Any] | None, r: dict[str, Any]) -> tuple[str, str]:
    if ref is None or r is ref:
        return "", ""
    return f"{ref['rate'] / r['rate']:.2f}×", f"{r['p50'] / ref['p50']:.2f}×"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated systems")
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the extra rows (celery group, rq worker-pool, rq SimpleWorker)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    console = Console(stderr=True)
    if {"celery", "rq"} & set(only):
        ensure_peers_venv()
    common = ["--jobs", str(args.jobs), "--calls", str(args.calls)]
    rounds: list[list[dict[str, Any]]] = []
    for round_no in range(args.rounds):
        rows: list[dict[str, Any]] = []
        for system in only:
            console.print(f"round {round_no + 1}/{args.rounds}: {system}…")
            if system.startswith("hostgpu-"):
                rows.append(hostgpu_row(system.removeprefix("hostgpu-"), args))
            elif system == "celery":
                extra = [] if args.no_extras else ["--group"]
                shape = ["--workers", str(args.workers), "--concurrency", str(args.concurrency)]
                rows += run_peer("run_celery.py", *common, *shape, *extra)
            elif system == "ray":
                rows += ray_row(args)
            else:
                extra = [] if args.no_extras else ["--pool", "--simple"]
                slots = str(args.workers * args.concurrency)
                rows += run_peer("run_rq.py", *common, "--workers", slots, *extra)
        rounds.append(rows)
    rows = medians(rounds)
    ref = next((r for r in rows if r["name"] == "hostgpu (sqlite)"), None)
    table = Table(
        title=f"dispatch vs peers: {args.jobs:,} no-op tasks, {args.calls} sequential round "
        f"trips; {args.workers * args.concurrency} concurrent job slots, same machine; "
        f"medians of {args.rounds} interleaved round(s)"
    )
    for col in ("system", "configuration", "jobs/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("system", "configuration") else "right")
    table.add_column("tput ratio", justify="right")
    table.add_column("p50 ratio", justify="right")
    table.caption = (
        "tput ratio = hostgpu (sqlite) jobs/s ÷ row jobs/s; "
        "p50 ratio = row p50 ÷ hostgpu (sqlite) p50; above 1× = hostgpu ahead"
    )
    for r in rows:
        table.add_row(
            r["name"],
            r.get("note", ""),
            f"{r['rate']:,.0f}",
            f"{r['p50'] * 1e3:.2f}",
            f"{r['p99'] * 1e3:.2f}",
            *ratios(ref, r),
        )
    out = Console()
    Console(width=max(out.width, 140)).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
