"""The worker protocol over HTTP: register, lease, heartbeat, report, stream and leave
(scope: worker, or share for a lent machine). Leasing, reporting and streaming are
``gateway/protocol.py``'s, shared with the worker channel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from hostgpu.api import (
    HeartbeatRequest,
    HeartbeatResponse,
    HeldLease,
    LeaseRequest,
    LeaseResponse,
    Registered,
    ReportRequest,
    ReportResponse,
    StreamBatch,
    StreamReply,
    WorkerList,
)
from hostgpu.capabilities import Capabilities
from hostgpu.errors import NotFound
from hostgpu.gateway.deps import Gateway, GatewayDep, ReaderOrWorker, WorkerId, WorkerOrShare, run
from hostgpu.gateway.protocol import check_access, lease_jobs, record_outcomes, relay_stream
from hostgpu.gateway.streams import StreamHub, tell_engines
from hostgpu.inference.jobs import INFERENCE_FUNCTION, LENDER_LABEL, MODEL_LABEL_PREFIX
from hostgpu.jobs import Lease
from hostgpu.tokens import TokenInfo

router = APIRouter(prefix="/v1/workers", tags=["workers"])


def _lent(caps: Capabilities, token: TokenInfo) -> Capabilities:
    functions = {
        name: options for name, options in caps.functions.items() if name == INFERENCE_FUNCTION
    }
    labels = {k: v for k, v in caps.labels.items() if k.startswith(MODEL_LABEL_PREFIX)} | {
        LENDER_LABEL: token.id
    }
    return caps.model_copy(
        update={"serves": "models", "functions": functions, "modules": [], "labels": labels}
    )


async def worker_access(
    request: Request, worker_id: WorkerId, gw: GatewayDep, token: WorkerOrShare
) -> TokenInfo:
    await check_access(request, gw.store, token, worker_id)
    return token


WorkerAccess = Annotated[TokenInfo, Depends(worker_access)]


@router.post("", status_code=201, response_model=Registered)
async def register(
    caps: Capabilities,
    request: Request,
    gw: GatewayDep,
    token: WorkerOrShare,
    worker_id: str | None = None,
) -> Registered:
    """Register (or, with ``worker_id``, re-register) a worker, its devices and the functions
    it publishes; jobs that waited for those functions' declarations are settled now.

    A ``share`` token registers a lent machine: whatever it says, it serves model engines
    only (it publishes nothing but the inference function), so no other job is ever leased
    to it, and it is labelled with the token's id."""
    if token.scope == "share":
        caps = _lent(caps, token)
    elif LENDER_LABEL in caps.labels:  # only the gateway says a machine is lent
        caps = caps.model_copy(
            update={"labels": {k: v for k, v in caps.labels.items() if k != LENDER_LABEL}}
        )
    if worker_id is not None:  # re-registering: only who may act for that worker
        try:
            await check_access(request, gw.store, token, worker_id)
        except NotFound:
            worker_id = None
    if worker_id is not None and not (len(worker_id) == 32 and worker_id.isalnum()):
        worker_id = None  # not one of ours: a fresh id
    new_id = await run(gw.store.register_worker, caps, worker_id)
    gw.notifier.worker_changed(new_id, caps)
    gw.waiting.invalidate()
    gw.resolver.forget(list(caps.functions))
    await run(gw.resolver.settle_pending, await run(gw.waiting.workers))
    # Jobs queued before this worker came (or whose declarations it just settled) are
    # runnable now for it: its first lease finds them; other waiters may fit too.
    gw.notifier.runnable(None)
    return Registered(
        worker_id=new_id,
        lease_seconds=gw.settings.lease_seconds,
        heartbeat_seconds=gw.settings.lease_seconds / 3,
        max_body_bytes=gw.settings.max_body_bytes,
        max_result_bytes=gw.settings.max_result_bytes,
        channel_revoke=True,
        channel_streams=True,
    )


@router.get("", response_model=WorkerList)
async def list_workers(gw: GatewayDep, _: ReaderOrWorker, alive: bool = False) -> WorkerList:
    """Registered workers and whether they are alive."""
    return WorkerList(workers=await run(gw.store.list_workers, alive_only=alive))


@router.post("/{worker_id}/lease", response_model=LeaseResponse)
async def lease(
    worker_id: WorkerId,
    body: LeaseRequest,
    request: Request,
    gw: GatewayDep,
    _: WorkerAccess,
) -> LeaseResponse:
    """Lease up to ``max_jobs`` jobs this worker can run; long-polls up to ``wait`` seconds."""
    leases = await lease_jobs(
        gw, request, worker_id, body.max_jobs, body.wait, request.is_disconnected
    )
    return LeaseResponse(leases=leases)


@router.post("/{worker_id}/drain", status_code=204)
async def drain(
    worker_id: WorkerId,
    request: Request,
    gw: GatewayDep,
    _: WorkerAccess,
) -> None:
    """The worker is stopping: its long polls end now and it is leased nothing more; its
    heartbeats keep its running jobs' leases until it deregisters."""
    await run(gw.store.drain_worker, worker_id)
    gw.notifier.drain(worker_id)
    await _forget_server(request, gw, worker_id)  # a leaving server takes no new request


@router.post("/{worker_id}/heartbeat", response_model=HeartbeatResponse)
async def heartbeat(
    worker_id: WorkerId,
    body: HeartbeatRequest,
    gw: GatewayDep,
    _: WorkerAccess,
) -> HeartbeatResponse:
    """Mark the worker alive, extend its leases; ``lost`` lists jobs it must stop."""
    result = await run(
        gw.store.heartbeat,
        worker_id,
        [(held.job_id, held.lease_token) for held in body.leases],
        lease_seconds=gw.settings.lease_seconds,
    )
    return HeartbeatResponse(
        lost=sorted({job_id for job_id, _ in result.lost}),
        lost_leases=[HeldLease(job_id=j, lease_token=t) for j, t in result.lost],
    )


@router.post("/{worker_id}/report", response_model=ReportResponse)
async def report(
    worker_id: WorkerId,
    body: ReportRequest,
    request: Request,
    gw: GatewayDep,
    _: WorkerAccess,
) -> ReportResponse:
    """Record outcomes (a stale or unknown lease token is refused: ``accepted: false``) and,
    with ``lease``, lease the worker's next jobs in the same round trip."""
    results = await record_outcomes(gw, body.outcomes)
    leases: list[Lease] = []
    if body.lease is not None:
        leases = await lease_jobs(
            gw, request, worker_id, body.lease.max_jobs, body.lease.wait, request.is_disconnected
        )
    return ReportResponse(results=results, leases=leases)


@router.delete("/{worker_id}", status_code=204)
async def deregister(
    worker_id: WorkerId, request: Request, gw: GatewayDep, _: WorkerAccess
) -> None:
    """The worker is stopping cleanly."""
    await run(gw.store.deregister_worker, worker_id)
    gw.notifier.worker_changed(worker_id)  # a read in flight must not cache it again
    await _forget_server(request, gw, worker_id)
    gw.waiting.invalidate()


@router.post("/{worker_id}/streams", response_model=StreamReply)
async def streams(
    worker_id: WorkerId,
    body: StreamBatch,
    request: Request,
    gw: GatewayDep,
    _: WorkerAccess,
) -> StreamReply:
    """A model server's token stream: the text of its running inference jobs, relayed to
    their readers on this gateway. ``cancelled``: jobs nobody reads any more, to stop.
    (A model server with a channel sends it there: ``ChannelUp.stream``.)"""
    return StreamReply(cancelled=await relay_stream(request, gw, worker_id, body))


async def _forget_server(request: Request, gw: Gateway, worker_id: str) -> None:
    """A model server is leaving: its engines no longer count, here or on other gateways."""
    hub: StreamHub = request.app.state.streams
    if worker_id in hub.engines:
        hub.forget(worker_id)
        if gw.store.shared:
            await tell_engines(gw.store, hub, [worker_id])
