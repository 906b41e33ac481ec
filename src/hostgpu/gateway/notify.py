"""Wake-ups for long polls: who is waiting for what, and who to wake when it happens.

Two kinds of waiters:

- result waiters (``GET /v1/jobs/{id}?wait``, ``/wait``, submit-and-wait) wait on a topic
  (``finished``) and re-read the store when it fires;
- lease waiters (an idle worker's long poll) carry the worker's capabilities. New runnable
  jobs wake only waiters that could run them, at most one per job, so ten idle workers do not
  all hit the store for one job, and a job no idle worker can run wakes none.

A waiter registers *before* it reads the store, so an event that lands between its read and
its wait is never lost. Events from other gateways on the same PostgreSQL database arrive
through the store's LISTEN/NOTIFY subscription (see :meth:`Notifier.heard_from_store`); an
enqueue's event describes its jobs' kinds, so it wakes one fitting waiter per job here too,
the warm model server first; other events carry no job details and wake every waiter.
Delayed wake-ups (a retry's backoff, a fallback's grace) are timers on this gateway's event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter

from hostgpu.capabilities import Capabilities
from hostgpu.jobs import Lease
from hostgpu.requirements import Requirements
from hostgpu.routing import pick_device

#: Long polls wake on events (this gateway's, and other gateways' through the store's
#: LISTEN/NOTIFY); re-reading the store after this long is only a safety net.
REPOLL_S = 30.0


@dataclass(frozen=True)
class Runnable:
    """What a newly runnable job needs, to pick the waiters that could take it."""

    function: str
    requirements: Requirements
    fallback: str | None = None
    #: Offered once already to a preferred worker that was between two polls (see
    #: ``Notifier.preference``): now any fitting waiter may take it.
    held: bool = False

    def fits(self, caps: Capabilities) -> bool:
        if self.function not in caps.functions:
            return False
        return (
            pick_device(self.requirements, caps, fallback_open=self.fallback == "cpu") is not None
        )


@dataclass(frozen=True)
class Preference:
    """How to offer one job: the order of the waiters, and whether to hold it a moment."""

    key: Callable[[LeaseWaiter], Any]
    hold: bool = False


@dataclass(eq=False)
class LeaseWaiter:
    """A long poll for leases: the worker's capabilities, and the most jobs it may take."""

    worker_id: str
    caps: Capabilities
    max_jobs: int = 1
    event: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set by :meth:`Notifier.claim`: a commit leases for this poll in its own thread, and
    #: hands it the leases (see ``gateway/handoff.py``).
    claim: asyncio.Future[list[Lease]] | None = None
    #: Inside :meth:`wait` (not reading the store): only then may a commit lease for it, or
    #: the poll's own read could take jobs too, more than ``max_jobs`` in all.
    waiting: bool = False

    def idle(self) -> bool:
        """Nobody has woken it, nor leases for it."""
        return not self.event.is_set() and self.claim is None

    async def wait(self, timeout: float) -> bool:
        if timeout <= 0:
            return self.event.is_set()
        # asyncio.timeout, not wait_for: wait_for runs the wait as a task of its own, and
        # that task's end is one more turn of the event loop before this poll leases (a turn
        # that, under a burst of requests, runs each of them first).
        self.waiting = True
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            return False
        finally:
            self.waiting = False
        return True

    async def claimed(self) -> list[Lease]:
        """The leases the commit that claimed this poll took for it ([]: none)."""
        assert self.claim is not None
        leases = await asyncio.shield(self.claim)
        self.claim = None
        return leases

    def hand(self, leases: list[Lease]) -> list[Lease]:
        """The claiming commit gives the poll its leases; returns those nobody will take (the
        poll has ended: :meth:`leave` dropped the claim), for the caller to hand back."""
        if self.claim is None or self.claim.done():
            return leases
        self.claim.set_result(leases)
        self.event.set()
        return []

    def leave(self) -> list[Lease]:
        """The poll ends; returns the leases a commit gave it that it did not take."""
        claim, self.claim = self.claim, None
        if claim is not None and claim.done() and not claim.cancelled():
            return claim.result()
        return []


class Notifier:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._lease_waiters: list[LeaseWaiter] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counts of events heard from other gateways (tests and metrics read them).
        self.heard: dict[str, int] = {}
        self._callbacks: dict[str, list[Callable[[], None]]] = {}
        #: Workers that said they are stopping (on this gateway or another).
        self.draining: set[str] = set()
        #: Workers' capabilities as this gateway last read them, for its lease polls. A
        #: worker that registers again replaces its entry (here) or drops it (on another
        #: gateway), and a resync (events may have been missed) drops them all.
        self.worker_caps: dict[str, Capabilities] = {}
        #: Bumped at each of those: a read of the store that began before one must not
        #: fill the cache with what it read (see :meth:`caps_version`).
        self._caps_versions: dict[str, int] = {}
        self._caps_epoch = 0
        #: For a job: a key that orders the fitting waiters (lowest first; None: arrival
        #: order), and whether a better worker than any waiting one is between two long polls.
        #: Such a job is held for ``hold_s``: that worker's next poll reads the store first and
        #: takes it; if it does not, the job is offered again to every fitting waiter. The
        #: inference routes use it to send a request to the server that has the model warm.
        self.preference: Callable[[Runnable, list[LeaseWaiter]], Preference | None] | None = None
        self.hold_s = 0.25
        #: Counts :meth:`runnable` calls: a lease poll that read the store when it was N, and
        #: found less than it could take, need not read again while it is still N.
        self.generation = 0
        #: The gateway is stopping: long polls answer at once with what they have.
        self.closing = False

    def close(self) -> None:
        """The gateway is stopping: wake every long poll, to answer now with what it has
        (its caller asks again: this gateway once it is back, or another). Otherwise the
        server's shutdown waits for them, then cancels them, and their callers get a 500."""
        self.closing = True
        for event in self._events.values():
            event.set()
        self._events.clear()
        for waiter in self._lease_waiters:
            waiter.event.set()

    # -- topics ------------------------------------------------------------------------------
    def event(self, topic: str) -> asyncio.Event:
        event = self._events.get(topic)
        if event is None:
            event = self._events[topic] = asyncio.Event()
        return event

    def notify(self, topic: str) -> None:
        event = self._events.pop(topic, None)
        if event is not None:
            event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        if timeout <= 0:
            return event.is_set()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- lease waiters -------------------------------------------------------------------------
    def lease_waiter(self, worker_id: str, caps: Capabilities, max_jobs: int = 1) -> LeaseWaiter:
        waiter = LeaseWaiter(worker_id, caps, max_jobs)
        self._lease_waiters.append(waiter)
        return waiter

    def remove(self, waiter: LeaseWaiter) -> None:
        with contextlib.suppress(ValueError):
            self._lease_waiters.remove(waiter)

    def runnable(self, jobs: Iterable[Runnable] | None = None) -> int:
        """Jobs became runnable: wake one fitting waiter per job (every waiter when ``jobs``
        is None: a change known only by its kind, from another gateway or a timer). Returns
        how many waiters were woken."""
        self.generation += 1
        self.notify("enqueued")
        if jobs is None:
            idle = [w for w in self._lease_waiters if w.idle()]
            for waiter in idle:
                waiter.event.set()
            return len(idle)
        chosen, held = self._choose(jobs)
        for waiter in chosen:
            waiter.event.set()
        for job in held:
            self.later(self.hold_s, [job])
        return len(chosen)

    def claim(self, jobs: Iterable[Runnable]) -> list[LeaseWaiter]:
        """A commit is about to store ``jobs`` and to lease them itself for the waiters that
        :meth:`runnable` would wake for them (``gateway/handoff.py``): mark those claimed,
        but only those that are waiting now. The commit hands each its leases, none
        included. The other jobs are left to the announcement that follows the commit,
        which wakes the waiters chosen here that were reading the store, as before."""
        if self.closing:
            return []
        chosen, _ = self._choose(jobs)
        claimed = [waiter for waiter in chosen if waiter.waiting]
        loop = asyncio.get_running_loop()
        for waiter in claimed:
            waiter.claim = loop.create_future()
        return claimed

    def _choose(self, jobs: Iterable[Runnable]) -> tuple[list[LeaseWaiter], list[Runnable]]:
        """One idle fitting waiter per job, the preferred first; and the jobs to hold a
        moment for a better worker that is between two polls (see ``preference``)."""
        idle = [w for w in self._lease_waiters if w.idle()]
        chosen: list[LeaseWaiter] = []
        held: list[Runnable] = []
        for job in jobs:
            preference = self.preference(job, idle) if self.preference is not None else None
            if preference is not None and preference.hold and not job.held:
                held.append(dataclasses.replace(job, held=True))
                continue
            for waiter in sorted(idle, key=preference.key) if preference is not None else idle:
                if job.fits(waiter.caps):
                    chosen.append(waiter)
                    # Rotate, so that one quick worker does not get every wake-up.
                    idle.remove(waiter)
                    break
            if not idle:
                break
        return chosen, held

    def drain(self, worker_id: str) -> None:
        """The worker is stopping: end its long polls now and lease it nothing more."""
        self.draining.add(worker_id)
        self.wake(worker_id)

    def worker_changed(self, worker_id: str, caps: Capabilities | None = None) -> None:
        """The worker registered again, with ``caps`` (None: on another gateway, or it left;
        read them from the store when next needed). Its long polls here end now: they wait
        with the capabilities they started with, and the worker's next poll brings the new
        ones. A worker that registers is no longer draining, wherever it said it was."""
        self._caps_versions[worker_id] = self._caps_versions.get(worker_id, 0) + 1
        if caps is None:
            self.worker_caps.pop(worker_id, None)
        else:
            self.worker_caps[worker_id] = caps
        self.draining.discard(worker_id)
        self.wake(worker_id)

    def caps_version(self, worker_id: str) -> tuple[int, int]:
        """Changes whenever the worker's cached capabilities may have gone stale: compare it
        before and after reading them from the store."""
        return self._caps_epoch, self._caps_versions.get(worker_id, 0)

    def wake(self, worker_id: str) -> None:
        """End the worker's long polls' waits now (they read the store again, or see that
        their caller left)."""
        for waiter in self._lease_waiters:
            if waiter.worker_id == worker_id:
                waiter.event.set()

    def later(self, delay: float, jobs: list[Runnable] | None = None) -> None:
        """Wake waiters for ``jobs`` after ``delay`` seconds (a retry's backoff, a grace)."""
        loop = self._loop or asyncio.get_running_loop()
        loop.call_later(max(0.0, delay) + 0.01, self.runnable, jobs)

    # -- other gateways ------------------------------------------------------------------------
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def heard_from_store(self, topic: str) -> None:
        """An event from another gateway (called from the store's listener thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._dispatch, topic)

    def on(self, topic: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` (on the event loop) when another gateway reports ``topic``."""
        self._callbacks.setdefault(topic, []).append(callback)

    def _dispatch(self, topic: str) -> None:
        kind = topic.partition(":")[0]
        self.heard[kind] = self.heard.get(kind, 0) + 1
        if kind == "echo":
            self.notify(topic)
            return
        for callback in self._callbacks.get(kind, []) + self._callbacks.get("resync", []) * (
            kind == "resync"
        ):
            callback()
        if kind == "runnable":
            self.runnable(_described(topic.partition(":")[2]))
        elif topic == "resync":
            self.runnable(None)
        if topic in ("finished", "resync"):
            self.notify("finished")
        if topic.startswith("drain:"):
            self.drain(topic.partition(":")[2])
        if topic.startswith("worker:"):
            self.worker_changed(topic.partition(":")[2])
        elif topic == "resync":
            self.worker_caps.clear()
            self._caps_epoch += 1
        self.notify(f"store:{topic.partition(':')[0]}")


def _described(details: str) -> list[Runnable] | None:
    """The jobs a ``runnable:<details>`` event describes (see ``Store.subscribe``), one entry
    per job; None (wake every idle waiter) when it describes none or cannot be read, or when
    a job may fall back to the CPU: when its fallback opens is known only where it was
    submitted, so here every idle waiter looks, as before events described their jobs."""
    if not details:
        return None
    try:
        kinds = _DESCRIBED.validate_json(details)
    except ValueError:  # malformed, or from a newer gateway: wake everyone
        return None
    if any(fallback is not None for _, _, fallback, _ in kinds):
        return None
    return [
        Runnable(function, requirements)
        for function, requirements, _, count in kinds
        for _ in range(min(count, MAX_DESCRIBED))
    ]


#: A described batch of more jobs than this wakes at most this many waiters per kind.
MAX_DESCRIBED = 1000
#: ``[[function, requirements, fallback, count], …]``, as the store writes it.
_DESCRIBED = TypeAdapter(
    list[
        tuple[
            Annotated[str, Field(max_length=300)],
            Requirements,
            Literal["cpu"] | None,
            Annotated[int, Field(ge=0)],
        ]
    ]
)
