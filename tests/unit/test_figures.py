"""The gateway's figure helpers: the throughput cache (against a real SQLite store) and the
queue advice (reasons and fixes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hostgpu.capabilities import Capabilities, Device
from hostgpu.functions import FunctionOptions, Requested, resolve
from hostgpu.gateway.figures import ThroughputCache, TTLCache
from hostgpu.gateway.queues import queue_stats
from hostgpu.jobs import Outcome
from hostgpu.requirements import Requirements
from hostgpu.stats import QueueGroup
from hostgpu.store import NewJob, open_store

CPU = Device(kind="cpu", name="cpu")
CUDA = Device(kind="cuda", index=0, name="NVIDIA T4", memory_bytes=16 * 1024**3)


def caps(*devices: Device, modules: tuple[str, ...] = ("m",), **labels: str) -> Capabilities:
    return Capabilities(
        name="w",
        devices=[*devices, CPU],
        labels=labels,
        modules=list(modules),
        functions={f"{m}:f": FunctionOptions() for m in modules},
    )


def finish(store: Any, n: int) -> None:
    asked = Requested()
    store.enqueue([NewJob("m:f", None, resolve("m:f", None, asked), asked, True)] * n)
    c = caps()
    worker = store.register_worker(c)
    leases = store.lease(worker, c, max_jobs=n, lease_seconds=30)
    store.report(
        [Outcome(job_id=x.job_id, lease_token=x.lease_token, status="succeeded") for x in leases]
    )


def test_throughput_cache_reads_each_final_bucket_once(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    asked: list[float] = []
    real = store.throughput

    def spy(since: float, bucket_s: float) -> Any:
        asked.append(since)
        return real(since, bucket_s)

    store.throughput = spy  # type: ignore[method-assign]
    try:
        finish(store, 5)
        now = time.time()
        since = (now - 600) // 60 * 60
        cache = ThroughputCache(store, seal_s=0)
        first = cache.get(since, 60, now=now)
        assert sum(b.succeeded for b in first) == 5 and asked == [since]
        # A minute later: the old buckets come from the cache, only the new ones are read.
        later = now + 60
        again = cache.get(since, 60, now=later)
        assert asked[-1] == (now // 60) * 60 and asked[-1] > since
        assert [b.model_dump() for b in again] == [b.model_dump() for b in first]
        # A longer window than the cache knows reads everything again.
        cache.get(since - 600, 60, now=later)
        assert asked[-1] == since - 600
    finally:
        store.close()


def test_ttl_cache_shares_a_value_for_its_ttl() -> None:
    calls = []
    cache = TTLCache(ttl=60)
    assert cache.get("k", lambda: calls.append(1) or 1) == 1
    assert cache.get("k", lambda: calls.append(1) or 2) == 1
    assert len(calls) == 1
    assert TTLCache(ttl=0).get("k", lambda: 3) == 3


def group(gpu: str, function: str = "m:f", **kw: Any) -> QueueGroup:
    now = time.time()
    fields: dict[str, Any] = {
        "queued": 2,
        "oldest_created_at": now - 30,
        "oldest_runnable_at": now - 20,
    }
    fields.update(kw)
    return QueueGroup(function=function, requirements=Requirements(gpu=gpu), **fields)


@pytest.mark.parametrize(
    ("groups", "workers", "waiting", "fix"),
    [
        ([group("mps")], [], "no worker is connected", None),
        ([group("mps")], [caps()], "no worker with mps", "natively on a Mac"),
        ([group("cuda")], [caps()], "no worker with cuda", "NVIDIA GPU"),
        ([group("cuda", "other:f")], [caps(CUDA)], "imports other", None),
        ([group("cpu")], [caps()], None, "busy"),
        ([group("cpu", delayed=2, oldest_runnable_at=None)], [caps()], None, "retry backoff"),
    ],
)
def test_queue_stats_say_why_and_what_to_do(
    groups: list[QueueGroup], workers: list[Capabilities], waiting: str | None, fix: str | None
) -> None:
    stats = queue_stats(groups, workers, time.time())
    [queue] = stats.queues
    [fn] = queue.functions
    assert (fn.waiting is None) == (waiting is None)
    if waiting:
        assert waiting in (fn.waiting or "")
    assert (fn.fix is None) == (fix is None), fn.fix
    if fix:
        assert fix in (fn.fix or "")
    assert stats.queued == 2


def test_memory_and_label_fixes() -> None:
    big = QueueGroup(
        function="m:f",
        requirements=Requirements(gpu="cuda", min_memory_gb=40),
        queued=1,
        oldest_created_at=time.time(),
    )
    [fn] = queue_stats([big], [caps(CUDA)], time.time()).queues[0].functions
    assert fn.fix and "40 GB" in fn.fix
    labelled = big.model_copy(
        update={"requirements": Requirements(gpu="cuda", labels={"rack": "b"})}
    )
    [fn] = queue_stats([labelled], [caps(CUDA, rack="a")], time.time()).queues[0].functions
    assert fn.fix and "--label rack=b" in fn.fix
    # The oldest wait is that of the longest-waiting runnable job; all delayed: none.
    now = time.time()
    stats = queue_stats([group("cpu", oldest_runnable_at=now - 90)], [caps()], now)
    assert stats.queues[0].oldest_wait_s == pytest.approx(90, abs=1)
