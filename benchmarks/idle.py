"""What an idle fleet costs: store transactions per second with N idle workers.

    python benchmarks/idle.py [--workers 10] [--seconds 60] [--backend sqlite|postgres]

A real gateway and ``--workers`` real worker processes with nothing to do. After they are
up (and one lease period has passed), the gateway's own transaction counter
(``hostgpu_store_transactions`` on /metrics, scrapes included) is read twice, ``--seconds``
apart. Target: at most 1 transaction per second in total for 10 idle workers. The baseline
row is the gateway alone, no worker, over the same time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dispatch import fresh_pg_database

from hostgpu.testing import Gateway, Worker

MIB = 1024 * 1024


def transactions(gw: Gateway) -> float:
    with gw.http() as http:
        text = http.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "hostgpu_store_transactions":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no hostgpu_store_transactions on /metrics")


def measure(url: str, home: Path, workers: int, seconds: float) -> dict[str, float]:
    gw = Gateway(home, url).start()
    fleet: list[Worker] = []
    try:
        started = time.monotonic()
        fleet = [Worker(gw).start() for _ in range(workers)]
        up = time.monotonic() - started
        rss = [psutil.Process(w.proc.pid).memory_info().rss / MIB for w in fleet if w.proc]
        time.sleep(35)  # past the first lease period and every worker's first long poll
        before = transactions(gw)
        time.sleep(seconds)
        after = transactions(gw)
        # One scrape (ours) costs its own reads: take them off.
        per_scrape = transactions(gw) - after
        return {
            "rate": (after - before - per_scrape) / seconds,
            "start_s": up / max(1, workers),
            "rss": max(rss) if rss else 0.0,
        }
    finally:
        for w in fleet:
            w.stop()
        gw.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args(argv)
    rows = []
    for n in (0, args.workers):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/idle.db" if args.backend == "sqlite" else fresh_pg_database()
            rows.append((n, measure(url, Path(tmp), n, args.seconds)))
    table = Table(
        title=f"idle fleet on {args.backend}: store transactions over {args.seconds:.0f} s"
    )
    for col in (
        "idle workers",
        "transactions/s",
        "target",
        "worker start→registered s",
        "worker RSS MiB",
    ):
        table.add_column(col, justify="right")
    for n, r in rows:
        table.add_row(
            str(n),
            f"{r['rate']:.2f}",
            "≤ 1" if n else "(baseline)",
            f"{r['start_s']:.2f}" if n else "",
            f"{r['rss']:.0f}" if n else "",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
