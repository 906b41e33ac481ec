"""Submit, read, wait for and cancel jobs (scope: submit; reading: read)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Response

from hostgpu.api import MAX_WAIT_S, JobBatch, JobIds, JobList, JobResults, Summary, WaitRequest
from hostgpu.errors import NotFound
from hostgpu.gateway.deps import AdminToken, Gateway, GatewayDep, JobId, ReadToken, SubmitToken, run
from hostgpu.gateway.intake import announce, store_jobs
from hostgpu.gateway.notify import REPOLL_S, Runnable
from hostgpu.jobs import Job, JobSpec, JobState
from hostgpu.store import JobFilter

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
COALESCE_S = 0.02
T = TypeVar("T")


async def _until_finished(
    gw: Gateway,
    job_id: str,
    wait: float,
    *,
    history: bool = True,
    event: asyncio.Event | None = None,
) -> Job:
    """The job once it is finished, or as it is when ``wait`` seconds have passed. With
    ``event`` (taken before the job was stored) the first read waits for a finish first."""
    deadline = time.monotonic() + wait
    while True:
        if event is not None:
            await gw.notifier.wait(event, min(wait, REPOLL_S))
        event = gw.notifier.event("finished")
        job = await run(gw.store.get, job_id, history=history)
        remaining = deadline - time.monotonic()
        if job.state.terminal or remaining <= 0 or gw.notifier.closing:
            return job
        await gw.notifier.wait(event, min(remaining, REPOLL_S))
        event = None


@router.post(
    "",
    status_code=201,
    response_model=Job,
    responses={200: {"model": Job, "description": "The idempotency key named an existing job"}},
)
async def submit_job(
    spec: JobSpec,
    gw: GatewayDep,
    _: SubmitToken,
    response: Response,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="seconds to wait for the job to finish: one request "
            "submits, runs and returns the result",
        ),
    ] = 0,
) -> Job:
    """Submit one job. Options left out take the function's declared ones; an option that
    widens the declaration is refused (422). An existing idempotency key returns its job (200).
    With ``wait``, the answer comes when the job finishes (or the wait ends).
    """
    started = time.time()
    finished = gw.notifier.event("finished")  # before the job exists: no finish is missed
    [job] = await store_jobs(gw, [spec])
    if job.created_at.timestamp() < started:
        response.status_code = 200  # the idempotency key named an existing job
    else:
        announce(gw.notifier, gw.settings, [job])
    if wait > 0 and not job.state.terminal:
        job = await _until_finished(gw, job.id, wait, history=False, event=finished)
    if not job.state.terminal:
        [job] = await run(gw.waiting.annotate, [job])
    return job


@router.post("/batch", status_code=201, response_model=JobIds)
async def submit_batch(
    batch: JobBatch,
    gw: GatewayDep,
    _: SubmitToken,
) -> JobIds:
    """Submit up to 5,000 jobs in one request; returns their ids in order (all or none)."""
    jobs = await store_jobs(gw, batch.jobs)
    announce(gw.notifier, gw.settings, jobs)
    return JobIds(ids=[j.id for j in jobs])


@router.get("", response_model=JobList)
async def list_jobs(
    gw: GatewayDep,
    _: ReadToken,
    state: JobState | None = None,
    function: Annotated[str | None, Query(max_length=300, pattern=r"^[\x20-\x7e]+$")] = None,
    worker: Annotated[str | None, Query(pattern=r"^[0-9a-f]{1,32}$")] = None,
    device: Annotated[str | None, Query(max_length=100, pattern=r"^[\x20-\x7e]+$")] = None,
    id_prefix: Annotated[str | None, Query(pattern=r"^[0-9a-f]{1,32}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[0-9]{1,12}(\.[0-9]{1,17})?:[0-9a-f]{1,32}$", description="next_cursor"),
    ] = None,
) -> JobList:
    """Newest jobs first, filtered; queued ones say why they wait. Page with ``cursor``."""
    where = JobFilter(
        state=state, function=function, worker_id=worker, device=device, id_prefix=id_prefix
    )
    jobs, next_cursor = await run(gw.store.list_jobs, where, limit=limit, cursor=cursor)
    return JobList(jobs=await run(gw.waiting.annotate, jobs), next_cursor=next_cursor)


@router.get("/summary", response_model=Summary)
async def summary(gw: GatewayDep, _: ReadToken) -> Summary:
    """How many jobs are in each state."""
    counts = await run(gw.store.count_by_state)
    return Summary(counts=counts, total=sum(counts.values()))


@router.post("/wait", response_model=JobList)
async def wait_jobs(
    body: WaitRequest,
    gw: GatewayDep,
    _: ReadToken,
) -> JobList:
    """Long-poll: the finished jobs among ``ids``, as soon as at least one is finished."""
    return JobList(jobs=await _first_finished(gw, body, gw.store.get_many, terminal_only=True))


@router.post("/results", response_model=JobResults)
async def job_results(
    body: WaitRequest,
    gw: GatewayDep,
    _: ReadToken,
) -> JobResults:
    """Long-poll as ``/wait``, answering with the finished jobs' results or errors only (what
    ``.map()`` reads: a fifth of the bytes, a quarter of the gateway's work per job)."""
    return JobResults(results=await _first_finished(gw, body, gw.store.results))


async def _first_finished(
    gw: Gateway, body: WaitRequest, read: Callable[..., list[T]], **options: Any
) -> list[T]:
    """What ``read`` finds among ``body.ids`` once at least one of them has finished (or
    nothing, when ``body.timeout`` passes first)."""
    deadline = time.monotonic() + body.timeout
    first = True
    while True:
        event = gw.notifier.event("finished")
        done = await run(read, body.ids, **options)
        remaining = deadline - time.monotonic()
        if done or remaining <= 0 or gw.notifier.closing:
            return done
        if first:  # a job that does not exist would never finish: say so, do not wait
            first = False
            if unknown := await run(gw.store.unknown, body.ids):
                more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise NotFound(
                    f"no job with id {unknown[0]!r}{more}: never submitted to this gateway's "
                    "store, or deleted since (`hostgpu prune` deletes finished jobs)"
                )
        woken = await gw.notifier.wait(event, min(remaining, REPOLL_S))
        if woken and len(body.ids) > 1:
            # Many jobs finish in bursts: let a few more land before reading the store
            # again, so a .map() costs a handful of queries per second, not one per result.
            await asyncio.sleep(min(COALESCE_S, max(0.0, deadline - time.monotonic())))


@router.get("/{job_id}", response_model=Job)
async def get_job(
    job_id: JobId,
    gw: GatewayDep,
    _: ReadToken,
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for it to finish")
    ] = 0,
) -> Job:
    """One job (by id or unique id prefix) with its attempts; ``wait`` long-polls until it
    finishes."""
    job = await _until_finished(gw, job_id, wait)
    [job] = await run(gw.waiting.annotate, [job])
    return job


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: JobId, gw: GatewayDep, _: SubmitToken) -> Job:
    """Cancel a job; a running one is killed at its worker's next heartbeat."""
    job = await run(gw.store.cancel, job_id)
    gw.metrics.record_cancelled(job)
    gw.notifier.notify("finished")
    return job


@router.post("/{job_id}/rerun", response_model=Job)
async def rerun_job(job_id: JobId, gw: GatewayDep, _: AdminToken) -> Job:
    """Queue a failed or cancelled job again, with its retries and lost leases reset."""
    job = await run(gw.store.rerun, job_id)
    gw.notifier.runnable([Runnable(job.function, job.requirements, job.fallback)])
    return job


@router.post("/{job_id}/requeue", response_model=Job)
async def requeue_job(job_id: JobId, gw: GatewayDep, _: AdminToken) -> Job:
    """Take a leased or running job back from its worker (stuck, or on the wrong machine) and
    queue it again; neither a retry nor a lost lease is used up. The worker stops the job at
    its next heartbeat, and its late report is refused."""
    # Runnable again only after one heartbeat period: by then its old worker has heard and
    # stopped it, so the worker cannot be handed the same job while still running it.
    delay = gw.settings.lease_seconds / 3 + 0.5
    job = await run(gw.store.requeue, job_id, delay_s=delay)
    gw.notifier.later(delay, [Runnable(job.function, job.requirements, job.fallback)])
    return job
