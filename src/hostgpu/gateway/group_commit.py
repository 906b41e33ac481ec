"""Group commit: submissions that arrive together are stored in one transaction and
answered (so announced to the workers) together.

Why: eight chat requests sent at once were eight transactions, each announced as it
committed. The model server's lease woke on the first, took one job and started generating;
the busy engine then slowed the server's next leases, so the other seven joined the batch
hundreds of milliseconds late (issue 12: +235 ms between the client and the engine's first
token at 8 streams). Here the submissions that arrive while a commit is in flight go into the
next one, and none is answered until the burst has drained (or has lasted ``max_hold_s``), so
the server's first lease finds them all. A lone submission commits at once, as before.

The stored jobs are announced to the workers (``on_stored``) before any submission resumes:
the lease then starts while the submissions answer their clients, instead of queueing behind
them on the event loop (measured at 8 requests on 2 cores: 3-5 ms from the last answer to
the lease read, which now overlaps the answers).

The jobs are leased in the commit's thread, right after it, for the long polls already
waiting for them (``handoff``, see ``gateway/handoff.py``); only the others are announced.

One submission's failure (a conflict, a bad row) fails only that submission: a batch that
raises is retried one submission at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hostgpu.gateway.deps import run
from hostgpu.gateway.handoff import Handoff
from hostgpu.jobs import Job, Lease
from hostgpu.store.interface import NewJob, Store

log = logging.getLogger("hostgpu.gateway")

#: How long a burst may hold the answers it has stored (a steady stream never drains).
MAX_HOLD_S = 0.02


@dataclass
class _Waiting:
    jobs: Sequence[NewJob]
    future: asyncio.Future[list[Job]]
    stored: list[Job] | None = None
    error: BaseException | None = None

    def answer(self) -> None:
        if self.future.done():  # the caller went away
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            assert self.stored is not None
            self.future.set_result(self.stored)


class GroupCommit:
    """``await enqueue(jobs)``: the store's ``enqueue``, grouped with concurrent callers."""

    def __init__(
        self,
        store: Store,
        *,
        max_hold_s: float = MAX_HOLD_S,
        on_stored: Callable[[list[Job]], None] = lambda jobs: None,
        handoff: Handoff | None = None,
    ) -> None:
        self._store = store
        self._handoff = handoff
        self._on_stored = on_stored
        self._max_hold_s = max_hold_s
        self._queue: list[_Waiting] = []
        self._drainer: asyncio.Task[None] | None = None
        self.transactions = 0  # for tests and metrics: commits made for the submissions

    async def enqueue(self, jobs: Sequence[NewJob]) -> list[Job]:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(jobs, loop.create_future())
        self._queue.append(waiting)
        drainer = self._drainer
        if drainer is None or drainer.done() or drainer.get_loop() is not loop:
            # (A drainer cancelled before it ran, or left on a closed loop, never reset.)
            self._drainer = loop.create_task(self._drain())
        try:
            return await waiting.future
        except asyncio.CancelledError:
            if waiting in self._queue:  # not committed yet: it never will be
                self._queue.remove(waiting)
            raise

    async def _drain(self) -> None:
        stored: list[_Waiting] = []  # committed, not yet answered
        leased: set[str] = set()  # ids of those jobs leased in the commit
        batch: list[_Waiting] = []
        burst = time.monotonic()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                leased |= await self._commit(batch)
                stored += batch
                batch = []
                if time.monotonic() - burst > self._max_hold_s:
                    self._answer(stored, leased)
                    stored, leased, burst = [], set(), time.monotonic()
        except BaseException as exc:  # cancelled at shutdown: nobody waits forever
            for waiting in batch + self._queue:
                waiting.error = exc
            stored += batch + self._queue
            self._queue = []
            raise
        finally:
            if self._drainer is asyncio.current_task():
                self._drainer = None
            self._answer(stored, leased)

    async def _commit(self, batch: list[_Waiting]) -> set[str]:
        """Store the batch; returns the ids of its jobs leased in the commit."""
        new = [j for w in batch for j in w.jobs]
        handoff = self._handoff
        claimed = handoff.claim(new) if handoff is not None else []
        leases: list[list[Lease]] = []

        def commit() -> list[Job]:
            jobs = self._store.enqueue(new)
            if handoff is not None and claimed:  # after the commit: durable before leased
                leases.extend(handoff.lease(claimed, len(new)))
            return jobs

        jobs: list[Job] | None = None
        try:
            jobs = await run(commit)
            self.transactions += 1
        except Exception:
            pass  # each submission on its own, below
        finally:  # cancelled too: no claimed poll waits for ever
            leased = handoff.hand(claimed, leases) if handoff is not None else set()
        if jobs is None:
            for waiting in batch:  # one submission's fault fails only that submission
                try:
                    waiting.stored = await run(self._store.enqueue, waiting.jobs)
                    self.transactions += 1
                except Exception as exc:
                    waiting.error = exc
            return leased
        at = 0
        for waiting in batch:
            waiting.stored = jobs[at : at + len(waiting.jobs)]
            at += len(waiting.jobs)
        return leased

    def _answer(self, done: list[_Waiting], leased: set[str]) -> None:
        stored = [job for waiting in done for job in waiting.stored or () if job.id not in leased]
        if stored:
            try:
                self._on_stored(stored)
            except Exception:  # they are stored: the workers' next polls find them
                log.exception("announcing %d stored jobs failed", len(stored))
        for waiting in done:
            waiting.answer()


__all__ = ["MAX_HOLD_S", "GroupCommit"]
