"""Submit, read, wait for and cancel jobs (scope: submit)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from hostgpu.gateway.deps import NotifierDep, SettingsDep, StoreDep, SubmitToken, run
from hostgpu.gateway.schemas import JobBatch, JobIds, JobList, Summary, WaitRequest
from hostgpu.jobs import Job, JobSpec, JobState

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
COALESCE_S = 0.02


def _explain(request: Request, jobs: list[Job]) -> list[Job]:
    return request.app.state.waiting.annotate(jobs)


@router.post(
    "",
    status_code=201,
    response_model=Job,
    responses={200: {"model": Job, "description": "The idempotency key named an existing job"}},
)
async def submit_job(
    spec: JobSpec, store: StoreDep, notifier: NotifierDep, _: SubmitToken, response: Response
) -> Job:
    """Submit one job. An existing idempotency key returns the existing job (200)."""
    started = time.time()
    [job] = await run(store.enqueue, [spec])
    if job.created_at.timestamp() < started:
        response.status_code = 200  # the idempotency key named an existing job
    else:
        notifier.notify("enqueued")
    return job


@router.post("/batch", status_code=201, response_model=JobIds)
async def submit_batch(
    batch: JobBatch, store: StoreDep, notifier: NotifierDep, _: SubmitToken
) -> JobIds:
    """Submit up to 5,000 jobs in one request; returns their ids in order."""
    jobs = await run(store.enqueue, batch.jobs)
    notifier.notify("enqueued")
    return JobIds(ids=[j.id for j in jobs])


@router.get("", response_model=JobList)
async def list_jobs(
    request: Request,
    store: StoreDep,
    _: SubmitToken,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[float | None, Query(description="created_at cursor (UNIX time)")] = None,
) -> JobList:
    """Newest jobs first; queued ones say why they wait."""
    jobs = await run(store.list_jobs, state=state, limit=limit, before=before)
    return JobList(jobs=await run(_explain, request, jobs))


@router.get("/summary", response_model=Summary)
async def summary(store: StoreDep, _: SubmitToken) -> Summary:
    """How many jobs are in each state."""
    counts = await run(store.count_by_state)
    return Summary(counts=counts, total=sum(counts.values()))


@router.post("/wait", response_model=JobList)
async def wait_jobs(
    body: WaitRequest, store: StoreDep, notifier: NotifierDep, settings: SettingsDep, _: SubmitToken
) -> JobList:
    """Long-poll: the finished jobs among ``ids``, as soon as at least one is finished."""
    deadline = time.monotonic() + body.timeout
    while True:
        event = notifier.event("finished")
        done = await run(store.get_many, body.ids, terminal_only=True)
        remaining = deadline - time.monotonic()
        if done or remaining <= 0:
            return JobList(jobs=done)
        woken = await notifier.wait(event, min(remaining, settings.poll_interval * 4))
        if woken and len(body.ids) > 1:
            # Many jobs finish in bursts: let a few more land before reading the store
            # again, so a .map() costs a handful of queries per second, not one per result.
            await asyncio.sleep(min(COALESCE_S, max(0.0, deadline - time.monotonic())))


@router.get("/{job_id}", response_model=Job)
async def get_job(
    job_id: str,
    request: Request,
    store: StoreDep,
    notifier: NotifierDep,
    settings: SettingsDep,
    _: SubmitToken,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for it to finish")] = 0,
) -> Job:
    """One job with its attempts; ``wait`` long-polls until it finishes."""
    deadline = time.monotonic() + wait
    while True:
        event = notifier.event("finished")
        job = await run(store.get, job_id, history=True)
        remaining = deadline - time.monotonic()
        if job.state.terminal or remaining <= 0:
            [job] = await run(_explain, request, [job])
            return job
        await notifier.wait(event, min(remaining, settings.poll_interval * 4))


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel_job(job_id: str, store: StoreDep, notifier: NotifierDep, _: SubmitToken) -> Job:
    """Cancel a job; a running one is killed at its worker's next heartbeat."""
    job = await run(store.cancel, job_id)
    notifier.notify("finished")
    return job
