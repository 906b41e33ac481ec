"""A deep queue: leasing, state counts and gateway memory with 100,000 queued jobs.

    python benchmarks/load.py [--jobs 100000] [--samples 200] [--backends sqlite,postgres]

For each backend, one real gateway process on 127.0.0.1 and a worker speaking HTTP
through :class:`hostgpu.client.Client` (no child processes, so only the gateway and
the store are measured):

1. baseline: ``--samples`` jobs in an otherwise empty store, leased one per request;
2. the same with ``--jobs`` more jobs queued behind them that the worker could also run;
3. the same with ``--jobs`` jobs queued ahead of them that the worker cannot run (they
   need ``mps``), the worst case for the lease query, which must skip them;
4. ``GET /v1/jobs/summary`` and ``hostgpu jobs --summary`` (the CLI, interpreter start
   included) against the full store;
5. the gateway's resident memory before, after filling and after all of the above.

The lease latencies are compared with the baseline of the same run (ratio, target ≤ 2×).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch import fresh_pg_database, percentile

from hostgpu.capabilities import Capabilities, Device
from hostgpu.client import Client
from hostgpu.functions import FunctionOptions
from hostgpu.jobs import JobSpec, Outcome, Payload
from hostgpu.testing import Gateway

BATCH = 5_000
MIB = 1024 * 1024


def _specs(n: int, gpu: str, tag: str, function: str) -> list[JobSpec]:
    return [
        JobSpec(
            function=function,
            payload=Payload(args=[i]),
            gpu=gpu,
            idempotency_key=f"{tag}-{i}",
        )
        for i in range(n)
    ]


def fill(
    client: Client,
    n: int,
    gpu: str,
    tag: str,
    progress: Progress,
    function: str = "hostgpu.builtin:noop",
) -> float:
    """Queue ``n`` jobs in batches; returns jobs/s of submission."""
    task = progress.add_task(f"queue {n:,} {gpu} jobs", total=n)
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        client.submit_batch(_specs(min(BATCH, n - start), gpu, f"{tag}-{start}", function))
        progress.advance(task, min(BATCH, n - start))
    return n / (time.perf_counter() - started)


def lease_samples(client: Client, worker_id: str, samples: int) -> list[float]:
    """Lease the ``samples`` jobs one request at a time; report them done afterwards."""
    latencies = []
    done = []
    for _ in range(samples):
        t = time.perf_counter()
        leases = client.lease(worker_id, max_jobs=1, wait=0)
        latencies.append(time.perf_counter() - t)
        assert len(leases) == 1, "a lease found no job although matching jobs are queued"
        lease = leases[0]
        done.append(Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status="succeeded"))
    for start in range(0, len(done), 500):
        client.report(worker_id, done[start : start + 500])
    return latencies


def cli_summary(gateway: Gateway) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(HOSTGPU_HOME=str(gateway.home), HOSTGPU_GATEWAY=gateway.url)
    env["HOSTGPU_TOKEN"] = gateway.token
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "hostgpu", "jobs", "--summary", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"hostgpu jobs --summary failed: {done.stdout}{done.stderr}")
    return elapsed


def run_backend(url: str, jobs: int, samples: int, console: Console) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        gateway = Gateway(Path(tmp), url).start()
        rss = psutil.Process(gateway.proc.pid if gateway.proc else 0)
        out: dict[str, float] = {"rss_start": rss.memory_info().rss / MIB}
        client = gateway.client()
        caps = Capabilities(
            name="load-bench",
            devices=[Device(kind="cpu", name="cpu")],
            modules=["hostgpu.builtin"],
            functions={"hostgpu.builtin:noop": FunctionOptions()},
        )
        try:
            worker_id = client.register(caps).worker_id
            with Progress(console=console, transient=True) as progress:
                fill(client, samples, "cpu", "base", progress)
                base = lease_samples(client, worker_id, samples)
                # Warm-up effects (first queries, caches) belong to no one phase: repeat.
                fill(client, samples, "cpu", "base2", progress)
                base = lease_samples(client, worker_id, samples)
                out["submit_rate"] = fill(client, jobs, "cpu", "deep", progress)
                deep = lease_samples(client, worker_id, samples)
                out["rss_filled"] = rss.memory_info().rss / MIB
                # Worst case: a second worker whose jobs sit behind everything above (the
                # runnable backlog's rest, for another module) and ``jobs`` that need a GPU
                # it lacks, all older than its own: the lease query must skip them all.
                other = Capabilities(
                    name="load-bench-other",
                    devices=[Device(kind="cpu", name="cpu")],
                    modules=["loadbench.other"],
                    functions={"loadbench.other:noop": FunctionOptions()},
                )
                other_id = client.register(other).worker_id
                fill(client, jobs, "mps", "blocked", progress)
                fill(client, samples, "cpu", "behind", progress, "loadbench.other:noop")
                blocked = lease_samples(client, other_id, samples)
            summary = []
            for _ in range(20):
                t = time.perf_counter()
                counts = client.summary()
                summary.append(time.perf_counter() - t)
            total = counts.total
            out["cli_summary"] = min(cli_summary(gateway) for _ in range(3))
            out["rss_end"] = rss.memory_info().rss / MIB
        finally:
            client.close()
            gateway.stop()
    out.update(
        total=total,
        base_p50=percentile(base, 0.5),
        base_p99=percentile(base, 0.99),
        deep_p50=percentile(deep, 0.5),
        deep_p99=percentile(deep, 0.99),
        blocked_p50=percentile(blocked, 0.5),
        blocked_p99=percentile(blocked, 0.99),
        summary_p50=percentile(summary, 0.5),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args(argv)
    console = Console()
    results = {}
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/load.db" if backend == "sqlite" else fresh_pg_database()
            console.print(f"running {backend}…")
            results[backend] = run_backend(url, args.jobs, args.samples, console)

    blocked = 2 * args.jobs - args.samples

    def ms(v: float) -> str:
        return f"{v * 1e3:.2f}"

    table = Table(title=f"load: {args.jobs:,} queued jobs, {args.samples} single-job leases")
    table.add_column("measure")
    for backend in results:
        table.add_column(backend, justify="right")
    rows: list[tuple[str, str]] = [
        ("jobs in store at the end", "{total:,.0f}"),
        ("submit (batches of 5,000), jobs/s", "{submit_rate:,.0f}"),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt.format(**r) for r in results.values()))
    for label, key in (
        ("lease p50 ms, near-empty queue (baseline)", "base_p50"),
        ("lease p99 ms, near-empty queue", "base_p99"),
        (f"lease p50 ms, {args.jobs:,} runnable queued", "deep_p50"),
        (f"lease p99 ms, {args.jobs:,} runnable queued", "deep_p99"),
        (f"lease p50 ms, behind {blocked:,} it cannot run", "blocked_p50"),
        (f"lease p99 ms, behind {blocked:,} it cannot run", "blocked_p99"),
        ("GET /v1/jobs/summary p50 ms", "summary_p50"),
    ):
        table.add_row(label, *(ms(r[key]) for r in results.values()))
    table.add_row(
        "runnable backlog vs baseline (p50, target ≤ 2×)",
        *(f"{r['deep_p50'] / r['base_p50']:.2f}×" for r in results.values()),
    )
    table.add_row(
        "blocked backlog vs baseline (p50)",
        *(f"{r['blocked_p50'] / r['base_p50']:.2f}×" for r in results.values()),
    )
    table.add_row(
        "`hostgpu jobs --summary` s (CLI start included, target < 1 s)",
        *(f"{r['cli_summary']:.2f}" for r in results.values()),
    )
    for label, key in (
        ("gateway RSS MiB at start", "rss_start"),
        ("gateway RSS MiB after filling", "rss_filled"),
        ("gateway RSS MiB at the end", "rss_end"),
    ):
        table.add_row(label, *(f"{r[key]:.0f}" for r in results.values()))
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
