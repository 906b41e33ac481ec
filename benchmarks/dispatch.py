"""Dispatch overhead: no-op jobs through hostgpu versus calling the function in-process.

    python benchmarks/dispatch.py [--jobs 10000] [--calls 200] [--workers 2]
                                  [--backends sqlite,postgres] [--transports channel,http]
    python benchmarks/dispatch.py --backend ray [--jobs 10000] [--calls 500]

For each backend: a real gateway process and N real worker processes on 127.0.0.1;
``.map`` over ``--jobs`` no-op jobs (throughput) and ``--calls`` sequential ``.remote()``
round trips (latency p50/p99). The baseline is the same function called in this process,
in the same run, so the table shows ratios rather than absolute seconds. ``--transports``:
how the workers take jobs, over their WebSocket channel (the default) or HTTP long polls
(``hostgpu worker --no-channel``), a row each, interleaved per backend.

``--backend ray``: a local Ray node (``hostgpu ray start --head``, ``--num-cpus`` CPUs) and,
through the same driver, raw Ray (the same no-op as ``@ray.remote``) against hostgpu on Ray
(``hostgpu.connect("ray")``), then the gateway backend (SQLite, ``--workers`` ×
``--concurrency``) on the same machine; the baseline is raw Ray (target: hostgpu on Ray at
≥ 0.9× its throughput, p50 within 1 ms).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    url: str,
    jobs: int,
    calls: int,
    workers: int,
    concurrency: int,
    worker_args: tuple[str, ...] = (),
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        gw = Gateway(home, url).start()
        fleet: list[Worker] = []
        try:
            fleet.extend(
                Worker(gw, concurrency=concurrency, extra_args=worker_args).start()
                for _ in range(workers)
            )
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


def _noop(x: object = None) -> object:
    return x


def through_ray(
    jobs: int, calls: int, num_cpus: int, rounds: int
) -> list[tuple[str, dict[str, float]]]:
    """Raw Ray and hostgpu on Ray through one driver, alternating ``rounds`` times."""
    import os

    import ray

    from hostgpu.ray.local import RayNode

    with tempfile.TemporaryDirectory() as tmp:
        head = RayNode(Path(tmp) / "head", num_cpus=num_cpus).start()
        old = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = head.gcs_address
        try:
            hostgpu.connect("ray")
            raw: Any = ray.remote(_noop)

            def raw_call(i: int) -> object:
                return ray.get(raw.remote(i))

            def raw_map(n: int) -> list[object]:
                return list(ray.get([raw.remote(i) for i in range(n)]))

            def ours_map(n: int) -> list[object]:
                return noop.map(range(n), batch_size=1000, progress=False)

            paths: dict[str, tuple[Any, Any]] = {
                "raw Ray (@ray.remote)": (raw_call, raw_map),
                "hostgpu on Ray": (noop.remote, ours_map),
            }
            for call, many in paths.values():  # start the workers, import everything once
                call(0)
                many(200)
            found: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for _ in range(rounds):
                for name, (call, many) in paths.items():
                    found[name].append(_measure(call, many, jobs, calls))
            # The best round of each: the machine is shared, the slowest rounds measure others.
            return [
                (name, max(runs, key=lambda r: r["rate"]) | {"p50": min(r["p50"] for r in runs)})
                for name, runs in found.items()
            ]
        finally:
            from hostgpu import sdk

            if sdk._backend is not None:
                sdk._backend.close()
                sdk._backend = None
            if old is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = old
            head.stop()


def _measure(call: object, many: object, jobs: int, calls: int) -> dict[str, float]:
    assert callable(call) and callable(many)
    lat = []
    for i in range(calls):
        t = time.perf_counter()
        assert call(i) == i
        lat.append(time.perf_counter() - t)
    started = time.perf_counter()
    results = many(jobs)
    elapsed = time.perf_counter() - started
    assert results == list(range(jobs)), "results out of order or missing"
    return {"rate": jobs / elapsed, "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def ray_table(args: argparse.Namespace, console: Console) -> None:
    base = in_process(args.jobs, args.calls)
    rows = [("in-process call", base)]
    console.print(f"running Ray ({args.num_cpus} CPUs, {args.rounds} rounds)…")
    rows += through_ray(args.jobs, args.calls, args.num_cpus, args.rounds)
    console.print("running the gateway backend (sqlite)…")
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(
            (
                "hostgpu gateway (sqlite)",
                through_hostgpu(
                    f"sqlite:///{tmp}/bench.db",
                    args.jobs,
                    args.calls,
                    args.workers,
                    args.concurrency,
                ),
            )
        )
    raw = dict(rows)["raw Ray (@ray.remote)"]
    table = Table(
        title=f"dispatch on Ray: {args.jobs} no-op calls via .map, {args.calls} sequential "
        f".remote(); best of {args.rounds} alternating rounds; gateway: {args.workers} "
        f"workers × {args.concurrency}"
    )
    for col in ("path", "calls/s", "p50 ms", "p99 ms", "calls/s vs raw Ray", "p50 − raw Ray"):
        table.add_column(col, justify="right")
    for name, r in rows:
        compare = name != "in-process call"
        table.add_row(
            name,
            f"{r['rate']:,.0f}",
            f"{r['p50'] * 1e3:.2f}",
            f"{r['p99'] * 1e3:.2f}",
            f"{r['rate'] / raw['rate']:.2f}×" if compare else "",
            f"{(r['p50'] - raw['p50']) * 1e3:+.2f} ms" if compare else "",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--transports", default="channel,http", help="channel, http or both")
    parser.add_argument(
        "--backend",
        choices=("gateway", "ray"),
        default="gateway",
        help="ray: raw Ray vs hostgpu on Ray vs the gateway backend",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="the Ray node's CPUs")
    parser.add_argument("--rounds", type=int, default=3, help="Ray: alternating rounds")
    args = parser.parse_args(argv)
    console = Console()
    if args.backend == "ray":
        ray_table(args, console)
        return 0
    base = in_process(args.jobs, args.calls)
    rows = [("in-process call", base)]
    for backend in args.backends.split(","):
        for transport in args.transports.split(","):
            flags = ("--no-channel",) if transport == "http" else ()
            with tempfile.TemporaryDirectory() as tmp:
                url = f"sqlite:///{tmp}/bench.db" if backend == "sqlite" else fresh_pg_database()
                console.print(f"running {backend} ({transport})…")
                rows.append(
                    (
                        f"hostgpu ({backend}, {transport})",
                        through_hostgpu(
                            url, args.jobs, args.calls, args.workers, args.concurrency, flags
                        ),
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
