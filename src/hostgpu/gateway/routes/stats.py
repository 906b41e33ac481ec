"""Figures about the queue, throughput and the fleet's load (scope: read)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from hostgpu.api import QueueStats, Throughput, WorkerActivity, WorkerActivityList
from hostgpu.gateway.deps import GatewayDep, ReadToken, run
from hostgpu.gateway.figures import ThroughputCache, TTLCache
from hostgpu.gateway.queues import queue_stats
from hostgpu.store import Store

router = APIRouter(prefix="/v1/stats", tags=["stats"])
MAX_BUCKETS = 1440


def _caches(request: Request, store: Store) -> tuple[ThroughputCache, TTLCache]:
    """This app's figure caches, made on first use (one per gateway process)."""
    state = request.app.state
    if not hasattr(state, "figure_caches"):
        state.figure_caches = (ThroughputCache(store), TTLCache(ttl=1.0))
    caches: tuple[ThroughputCache, TTLCache] = state.figure_caches
    return caches


@router.get("/queues", response_model=QueueStats)
async def queues(request: Request, gw: GatewayDep, _: ReadToken) -> QueueStats:
    """Queued jobs per requirement: how many, the oldest wait, and per function why they wait
    and what to do about it (figures at most a second old)."""
    recent = _caches(request, gw.store)[1]
    groups = await run(recent.get, "queues", gw.store.queue_groups)
    workers = await run(gw.waiting.workers)
    return queue_stats(groups, workers, time.time())


@router.get("/throughput", response_model=Throughput)
async def throughput(
    request: Request,
    gw: GatewayDep,
    _: ReadToken,
    window: Annotated[
        float, Query(ge=60, le=7 * 86400, description="seconds back from now")
    ] = 3600,
    bucket: Annotated[float, Query(ge=1, le=86400, description="seconds per bucket")] = 60,
) -> Throughput:
    """Jobs finished per bucket (succeeded, failed, cancelled) with their mean and longest
    queue wait and mean run time; buckets where nothing finished are left out. At most 1,440
    buckets: a finer ``bucket`` is widened (``bucket_s`` in the answer says to what)."""
    bucket = max(bucket, window / MAX_BUCKETS)
    now = time.time()
    # Buckets aligned to multiples of their size: two dashboards (and two refreshes) agree.
    since = (now - window) // bucket * bucket
    cache, recent = _caches(request, gw.store)
    buckets = await run(
        recent.get, ("throughput", since, bucket), lambda: cache.get(since, bucket, now)
    )
    return Throughput(
        since=since,
        window_s=window,
        bucket_s=bucket,
        buckets=buckets,
        succeeded=sum(b.succeeded for b in buckets),
        failed=sum(b.failed for b in buckets),
        cancelled=sum(b.cancelled for b in buckets),
    )


@router.get("/workers", response_model=WorkerActivityList)
async def workers(
    request: Request,
    gw: GatewayDep,
    _: ReadToken,
    window: Annotated[float, Query(ge=10, le=86400, description="seconds back from now")] = 300,
) -> WorkerActivityList:
    """Per worker: jobs running on it now, and jobs it finished in the window (per minute;
    figures at most a second old)."""
    recent = _caches(request, gw.store)[1]
    loads = await run(
        recent.get, ("workers", window), lambda: gw.store.worker_load(time.time() - window)
    )
    return WorkerActivityList(
        window_s=window,
        workers=[
            WorkerActivity(
                **load.model_dump(), per_minute=(load.succeeded + load.failed) * 60 / window
            )
            for load in loads
        ],
    )
