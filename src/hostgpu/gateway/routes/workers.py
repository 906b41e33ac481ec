"""Register, lease, heartbeat and report (scope: worker)."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request

from hostgpu.api import (
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseRequest,
    LeaseResponse,
    Registered,
    ReportRequest,
    ReportResponse,
    WorkerList,
)
from hostgpu.capabilities import Capabilities
from hostgpu.gateway.deps import (
    NotifierDep,
    ReaderOrWorker,
    ResolverDep,
    SettingsDep,
    StoreDep,
    WaitingDep,
    WorkerId,
    WorkerToken,
    run,
)
from hostgpu.jobs import JobError, Outcome
from hostgpu.store import Store

router = APIRouter(prefix="/v1/workers", tags=["workers"])


def _capabilities(request: Request, store: Store, worker_id: str) -> Capabilities:
    cache: dict[str, Capabilities] = request.app.state.worker_caps
    caps = cache.get(worker_id)
    if caps is None:
        caps = store.get_worker(worker_id).capabilities
        cache[worker_id] = caps
    return caps


@router.post("", status_code=201, response_model=Registered)
async def register(
    caps: Capabilities,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    resolver: ResolverDep,
    waiting: WaitingDep,
    notifier: NotifierDep,
    _: WorkerToken,
    worker_id: str | None = None,
) -> Registered:
    """Register (or, with ``worker_id``, re-register) a worker, its devices and the functions
    it publishes; jobs that waited for those functions' declarations are settled now."""
    if worker_id is not None and not (len(worker_id) == 32 and worker_id.isalnum()):
        worker_id = None  # not one of ours: a fresh id
    new_id = await run(store.register_worker, caps, worker_id)
    request.app.state.worker_caps[new_id] = caps
    waiting.invalidate()
    resolver.forget(list(caps.functions))
    if await run(resolver.settle_pending, await run(waiting.workers)):
        notifier.notify("enqueued")
    return Registered(
        worker_id=new_id,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.lease_seconds / 3,
    )


@router.get("", response_model=WorkerList)
async def list_workers(store: StoreDep, _: ReaderOrWorker, alive: bool = False) -> WorkerList:
    """Registered workers and whether they are alive."""
    return WorkerList(workers=await run(store.list_workers, alive_only=alive))


@router.post("/{worker_id}/lease", response_model=LeaseResponse)
async def lease(
    worker_id: WorkerId,
    body: LeaseRequest,
    request: Request,
    store: StoreDep,
    notifier: NotifierDep,
    settings: SettingsDep,
    _: WorkerToken,
) -> LeaseResponse:
    """Lease up to ``max_jobs`` jobs this worker can run; long-polls up to ``wait`` seconds."""
    caps = await run(_capabilities, request, store, worker_id)
    deadline = time.monotonic() + body.wait
    while True:
        event = notifier.event("enqueued")
        leases = await run(
            store.lease,
            worker_id,
            caps,
            max_jobs=body.max_jobs,
            lease_seconds=settings.lease_seconds,
        )
        remaining = deadline - time.monotonic()
        if leases or remaining <= 0 or await request.is_disconnected():
            return LeaseResponse(leases=leases)
        await notifier.wait(event, min(remaining, settings.poll_interval * 4))


@router.post("/{worker_id}/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(
    worker_id: WorkerId,
    body: HeartbeatRequest,
    store: StoreDep,
    settings: SettingsDep,
    _: WorkerToken,
) -> HeartbeatResponse:
    """Mark the worker alive, extend its leases; ``lost`` lists jobs it must stop."""
    result = await run(
        store.heartbeat,
        worker_id,
        [(held.job_id, held.lease_token) for held in body.leases],
        lease_seconds=settings.lease_seconds,
    )
    return HeartbeatResponse(lost=result.lost)


def _limit_results(outcomes: list[Outcome], limit: int) -> list[Outcome]:
    """Turn an oversized result into a failure the caller can read, not a stuck report."""
    checked = []
    for outcome in outcomes:
        if outcome.status == "succeeded" and outcome.result is not None:
            size = len(json.dumps(outcome.result, separators=(",", ":")))
            if size > limit:
                error = JobError(
                    type="ResultTooLarge",
                    message=f"the result is {size} bytes, over the gateway's limit of {limit} "
                    "(HOSTGPU_MAX_RESULT_BYTES); return a path or a URL",
                    kind="limit",
                )
                outcome = outcome.model_copy(
                    update={"status": "failed", "result": None, "retryable": False, "error": error}
                )
        checked.append(outcome)
    return checked


@router.post("/{worker_id}/report", response_model=ReportResponse)
async def report(
    worker_id: WorkerId,
    body: ReportRequest,
    store: StoreDep,
    notifier: NotifierDep,
    settings: SettingsDep,
    _: WorkerToken,
) -> ReportResponse:
    """Record outcomes; a stale or unknown lease token is refused (``accepted: false``)."""
    outcomes = _limit_results(body.outcomes, settings.max_result_bytes)
    results = await run(store.report, outcomes)
    if any(o.status != "started" for o in outcomes):
        notifier.notify("finished")
    if any(o.status in ("released", "failed") for o in outcomes):
        notifier.notify("enqueued")
    return ReportResponse(results=results)


@router.delete("/{worker_id}", status_code=204)
async def deregister(
    worker_id: WorkerId, request: Request, store: StoreDep, waiting: WaitingDep, _: WorkerToken
) -> None:
    """The worker is stopping cleanly."""
    await run(store.deregister_worker, worker_id)
    request.app.state.worker_caps.pop(worker_id, None)
    waiting.invalidate()
