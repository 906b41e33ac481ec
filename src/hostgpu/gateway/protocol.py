"""What a worker may do, whatever carries it: the access rule, the capabilities cache, the
lease long poll, handing back undelivered leases, recording outcomes and relaying a model
server's token stream. The HTTP routes (``routes/workers.py``) and the worker channel
(``routes/channel.py``) are two transports over these verbs, and the group commit's handoff
(``handoff.py``) hands leases back through them."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import HTTPException
from starlette.requests import HTTPConnection

from hostgpu.api import StreamBatch
from hostgpu.capabilities import Capabilities
from hostgpu.gateway.deps import Gateway, run, spawn
from hostgpu.gateway.notify import REPOLL_S, Notifier
from hostgpu.gateway.streams import StreamHub, tell_engines
from hostgpu.inference.jobs import LENDER_LABEL
from hostgpu.jobs import JobState, Lease, Outcome, ReportResult, result_too_large
from hostgpu.store import Store
from hostgpu.tokens import TokenInfo

log = logging.getLogger("hostgpu.gateway")


async def check_access(
    request: HTTPConnection, store: Store, token: TokenInfo, worker_id: str
) -> None:
    """A ``share`` token acts only for the machine it registered (never for a function
    worker, whose jobs it would otherwise lease and read), and a lent machine only for that
    token: a ``worker`` token could otherwise lease its requests (and read their prompts),
    report for them, drop its leases or deregister it. Who registered a machine is its
    ``LENDER_LABEL``, which only a share token's registration sets. An admin token acts for
    any worker. NotFound for an unknown worker."""
    if token.scope == "admin":
        return
    caps = await worker_capabilities(request, store, worker_id)
    lender = caps.labels.get(LENDER_LABEL)
    if token.scope == "share" and (caps.serves != "models" or lender != token.id):
        raise HTTPException(403, "a share token acts only for the machine it registered")
    if token.scope != "share" and lender is not None:
        raise HTTPException(
            403,
            f"worker {worker_id} is a machine lent with a share token: only that token acts "
            "for it (an admin token may stop it)",
        )


async def worker_capabilities(
    request: HTTPConnection, store: Store, worker_id: str
) -> Capabilities:
    """The worker's capabilities, from this gateway's cache (the store only on a miss)."""
    notifier: Notifier = request.app.state.notifier
    caps = notifier.worker_caps.get(worker_id)
    if caps is None:
        before = notifier.caps_version(worker_id)
        caps = (await run(store.get_worker, worker_id)).capabilities
        # A registration heard while the read ran may be newer than what it read: then this
        # poll uses it once, uncached, and the next one reads again.
        if notifier.caps_version(worker_id) == before:
            notifier.worker_caps[worker_id] = caps
    return caps


async def lease_jobs(
    gw: Gateway,
    request: HTTPConnection,
    worker_id: str,
    max_jobs: int,
    wait: float,
    gone: Callable[[], Awaitable[bool]] | None = None,
) -> list[Lease]:
    """Lease up to ``max_jobs`` jobs; long-poll up to ``wait`` seconds when there are none.

    The waiter registers before the store is read, so a job enqueued in between wakes it.
    Only new jobs this worker could run wake it (see :class:`Notifier`), and an empty read
    takes no write lock: an idle fleet costs the store a read per worker per long poll.
    A poll that follows one which found fewer jobs than it could take skips even that read
    when nothing became runnable since (the notifier's generation has not moved): a worker
    polls again right after each lease, and that read was a store call per job. The re-read
    after ``REPOLL_S`` (the safety net) always reads. Only on a store with one writer
    (SQLite): on PostgreSQL a short lease may mean rows another gateway held for a moment,
    and other gateways' retries become runnable without a wake-up here.
    ``gone``: whether the caller left (asked after each wait).
    """
    caps = await worker_capabilities(request, gw.store, worker_id)
    if worker_id in gw.notifier.draining:
        return []
    # The long poll is this worker's sign of life while it holds no leases (no heartbeat
    # writes from idle workers): the write happens only when the last contact is stale, and
    # this gateway asks the store only once per heartbeat period.
    # The touch rides on the first lease transaction (one write instead of a write and a read).
    state = request.app.state
    touched: dict[str, float] = state.touched
    drained: dict[str, int] = state.drained
    period = gw.settings.lease_seconds / 3
    touch: float | None = None
    if time.monotonic() - touched.get(worker_id, -1e9) >= period:
        touch = period
    deadline = time.monotonic() + wait
    waiter = gw.notifier.lease_waiter(worker_id, caps, max_jobs)
    woken = waited = False
    try:
        while True:
            generation = gw.notifier.generation
            # A commit that stored jobs for this poll may have leased them in its thread
            # (gateway/handoff.py): those are this poll's read. (Nothing else wakes a
            # claimed poll, so its event is cleared after, not before.)
            leases = await waiter.claimed() if waiter.claim is not None else []
            waiter.event.clear()
            if leases:
                drained.pop(worker_id, None)
            elif touch is None and not waited and drained.get(worker_id) == generation:
                pass  # read already, and nothing is new since
            else:
                leases = await run(
                    gw.store.lease,
                    worker_id,
                    caps,
                    max_jobs=max_jobs,
                    lease_seconds=gw.settings.lease_seconds,
                    probe=not woken,
                    touch_older_than=touch,
                )
                if len(leases) < max_jobs and not gw.store.shared:
                    drained[worker_id] = generation
                else:
                    drained.pop(worker_id, None)
            if touch is not None:
                touched[worker_id] = time.monotonic()
                touch = None
            remaining = deadline - time.monotonic()
            if leases:
                gw.notifier.notify("leased")
                # The server may stream these jobs' text: its first tokens need no store read.
                request.app.state.streams.leased(worker_id, leases)
                return leases
            if remaining <= 0 or worker_id in gw.notifier.draining or gw.notifier.closing:
                return leases
            woken = await waiter.wait(min(remaining, REPOLL_S))
            waited = True
            # A poll that just arrived is not gone yet (the check costs a receive under a
            # cancel scope, a few per cent of the gateway per job): ask after each wait,
            # before a store call whose leases nobody would receive.
            if gone is not None and await gone():
                return []
            if worker_id in gw.notifier.draining or gw.notifier.closing:
                return []
            if gw.notifier.worker_caps.get(worker_id) is not caps:
                return []  # registered again: the next poll leases by the new capabilities
            if not woken and waiter.claim is None and time.monotonic() >= deadline:
                return []  # nothing woke it: the store has nothing new for it either
    finally:
        gw.notifier.remove(waiter)
        # Leases a commit took for this poll after all, once it has ended: runnable again.
        hand_back(gw, waiter.leave())


def hand_back(gw: Gateway, leases: list[Lease]) -> asyncio.Task[None] | None:
    """Leases taken for a worker that will not hear of them (its channel closed, its poll
    ended): make their jobs runnable again now rather than when the leases expire. Await
    the task where the caller can (a stopping gateway may cancel it otherwise)."""
    return spawn(_release(gw, leases)) if leases else None


async def _release(gw: Gateway, leases: list[Lease]) -> None:
    outcomes = [
        Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status="released")
        for lease in leases
    ]
    try:
        await record_outcomes(gw, outcomes)
    except Exception as exc:  # they expire with their lease instead
        log.warning("could not hand back %d undelivered lease(s): %s", len(leases), exc)


def _limit_results(outcomes: list[Outcome], limit: int) -> list[Outcome]:
    """Turn an oversized result into a failure the caller can read, not a stuck report."""
    checked = []
    for outcome in outcomes:
        if outcome.status == "succeeded" and outcome.result is not None:
            size = len(json.dumps(outcome.result, separators=(",", ":")))
            if size > limit:
                error = result_too_large(size, limit)
                outcome = outcome.model_copy(
                    update={"status": "failed", "result": None, "retryable": False, "error": error}
                )
        checked.append(outcome)
    return checked


async def record_outcomes(gw: Gateway, outcomes: list[Outcome]) -> list[ReportResult]:
    """Record a worker's outcomes and wake who waits on them (the report route's and the
    channel's one way)."""
    outcomes = _limit_results(outcomes, gw.settings.max_result_bytes)
    results = await run(gw.store.report, outcomes) if outcomes else []
    if any(o.status != "started" for o in outcomes):
        gw.notifier.notify("finished")
    if any(o.status == "released" for o in outcomes):
        gw.notifier.runnable(None)
    for result in results:
        if result.retry_in_s is not None:  # wake its workers when its backoff ends
            gw.notifier.later(result.retry_in_s, None)
    gw.metrics.note_reported(outcomes, results)
    return results


async def relay_stream(
    request: HTTPConnection, gw: Gateway, worker_id: str, body: StreamBatch
) -> list[str]:
    """Relay a model server's stream batch to its readers (here, or on the gateway that has
    them); returns the jobs it must stop: nobody reads them, or they are not its own."""
    hub: StreamHub = request.app.state.streams
    if body.engines is not None and worker_id not in request.app.state.notifier.draining:
        caps = await worker_capabilities(request, gw.store, worker_id)
        changed = hub.note_engines(worker_id, caps.name, caps.concurrency, body.engines)
    else:
        changed = False
    cancelled: set[str] = set()
    forward: list[str] = []
    # Decided before the read below: meanwhile the hub may drop entries (recheck, close).
    allowed = {e.job_id: hub.verified(e.job_id, worker_id) for e in body.events}
    unknown = sorted(job_id for job_id, ok in allowed.items() if ok is None)
    if unknown:  # leased by another gateway, or before this one started: one read for all
        running = await run(_running_on, gw.store, unknown, worker_id)
        for job_id in unknown:
            allowed[job_id] = job_id in running
            hub.verify(job_id, worker_id, job_id in running)
    for event in body.events:
        if not allowed[event.job_id]:
            cancelled.add(event.job_id)
        elif gw.store.shared and not hub.local(event.job_id):
            forward += hub.forward(event)  # its reader waits on another gateway
        elif hub.publish(event):
            cancelled.add(event.job_id)
    if forward:
        # Before the reply: the server's next batch is forwarded after this one.
        await run(gw.store.broadcast, "stream", forward)
    if changed and gw.store.shared:  # after the text: it is what a reader waits for
        await tell_engines(gw.store, hub, [worker_id])
    return sorted(cancelled)


def _running_on(store: Store, job_ids: list[str], worker_id: str) -> set[str]:
    """Which of the jobs are leased to this worker now (only its server may stream their
    text)."""
    return {
        job.id
        for job in store.get_many(job_ids)
        if job.worker_id == worker_id and job.state in (JobState.leased, JobState.running)
    }
