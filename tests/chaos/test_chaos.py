"""Chaos at CI size: SIGKILL workers and a gateway mid-run; every job succeeds exactly once.

The full-size run (10,000 jobs) is ``python benchmarks/chaos.py``; both use
:func:`run_chaos` from that script.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "hostgpu_bench_chaos", ROOT / "benchmarks/chaos.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _check(out: dict[str, Any]) -> None:
    print(
        f"\nchaos {out['backend']}: {out['jobs']} jobs in {out['wall_s']:.1f}s, "
        f"{out['worker_kills']} worker kills, {out['gateway_kills']} gateway kill(s), "
        f"{out['executions']} executions, {out['duplicates']} duplicate(s), "
        f"max attempts {out['max_attempts']}"
    )
    assert not out["timed_out"], out
    assert out["submitted"] == out["jobs"], out
    assert out["lost"] == 0, out
    assert out["jobs_in_store"] == out["jobs"], out  # no job created twice either
    assert out["failed"] == 0, out
    assert out["succeeded"] == out["jobs"], out
    assert out["wrong_result"] == 0, out
    assert out["double_results"] == 0, out
    # Every succeeded job ran at least once: its execution is on record.
    assert out["executed_keys"] == out["jobs"], out
    assert out["worker_kills"] >= 1, out
    assert out["gateway_kills"] == 1, out


@pytest.mark.slow
@pytest.mark.postgres
def test_chaos_postgres_two_gateways(pg_url: str, home: Path) -> None:
    out = bench.run_chaos(
        "postgres",
        jobs=500,
        workers=3,
        gateways=2,
        kill_every=1.5,
        home=home,
        database_url=pg_url,
        concurrency=2,
        sleep_s=0.03,
        timeout=300,  # a bound on a failure, not a speed target: 20–35 s when quiet
        seed=4,
    )
    _check(out)


@pytest.mark.slow
def test_chaos_sqlite_one_gateway(home: Path) -> None:
    out = bench.run_chaos(
        "sqlite",
        jobs=300,
        workers=2,
        gateways=1,
        kill_every=1.5,
        home=home,
        concurrency=2,
        sleep_s=0.03,
        timeout=300,  # a bound on a failure, not a speed target: 20–35 s when quiet
        seed=4,
    )
    _check(out)
