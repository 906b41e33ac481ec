"""Leasing in the commit (gateway/handoff.py), over a real gateway app and SQLite store: a
waiting poll gets a burst's jobs from the commit that stored them, within its ``max_jobs``;
the rest are announced; leases of a poll that ended are handed back; a failed commit leaves
the poll to read the store itself."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from hostgpu.capabilities import Capabilities, Device
from hostgpu.errors import StoreUnavailable
from hostgpu.functions import FunctionOptions, Requested, resolve
from hostgpu.gateway import create_app
from hostgpu.gateway.notify import LeaseWaiter, Notifier, Runnable
from hostgpu.gateway.protocol import lease_jobs
from hostgpu.gateway.streams import StreamHub
from hostgpu.inference.jobs import (
    INFERENCE_FUNCTION,
    MODEL_LABEL_VALUE,
    EngineState,
    function_options,
    model_label,
)
from hostgpu.jobs import JobState, Lease, Payload
from hostgpu.requirements import Requirements
from hostgpu.settings import Settings
from hostgpu.store import NewJob

FUNCTION = "m:f"
CAPS = Capabilities(
    name="w",
    devices=[Device(kind="cpu", name="cpu")],
    functions={FUNCTION: FunctionOptions(gpu="cpu")},
    concurrency=8,
)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Any]:
    app = create_app(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 's.db'}"))
    yield app
    app.state.store.close()


def job(n: int, function: str = FUNCTION) -> NewJob:
    asked = Requested(gpu="cpu")
    return NewJob(function, Payload(args=[n]), resolve(function, None, asked), asked, resolved=True)


class Poll:
    """A worker's long poll, as the lease route and the channel run it; ``reads`` counts the
    store's lease calls for its worker (its own reads and a commit's)."""

    def __init__(self, app: Any, max_jobs: int) -> None:
        self.app = app
        self.worker_id = app.state.store.register_worker(CAPS)
        self.reads = 0
        self.left = False
        real = app.state.store.lease

        def lease(worker_id: str, *args: Any, **kwargs: Any) -> list[Lease]:
            self.reads += worker_id == self.worker_id
            return real(worker_id, *args, **kwargs)

        app.state.store.lease = lease
        self.task = asyncio.ensure_future(
            lease_jobs(
                app.state, SimpleNamespace(app=app), self.worker_id, max_jobs, 5.0, self._gone
            )
        )

    async def _gone(self) -> bool:
        return self.left

    async def waiting(self) -> None:
        """Until the poll waits (after its first read of the store)."""
        for _ in range(2500):
            if any(w.waiting for w in self.app.state.notifier._lease_waiters):
                return
            await asyncio.sleep(0.002)
        raise AssertionError("the poll never waited")


def test_a_waiting_poll_takes_a_burst_from_its_commit_within_max_jobs(app: Any) -> None:
    announced: list[str] = []
    group = app.state.group_commit
    on_stored = group._on_stored

    def announce(jobs: list[Any]) -> None:
        announced.extend(j.id for j in jobs)
        on_stored(jobs)

    group._on_stored = announce

    async def scenario() -> tuple[list[Lease], list[Any], int]:
        poll = Poll(app, max_jobs=3)
        await poll.waiting()
        reads = poll.reads
        stored = await asyncio.gather(*(group.enqueue([job(n)]) for n in range(5)))
        leases = await asyncio.wait_for(poll.task, 5)
        return leases, [s[0] for s in stored], poll.reads - reads

    leases, stored, reads = asyncio.run(scenario())
    assert len(leases) == 3  # its max_jobs, though five came
    assert reads == 1  # the commit's: no read of its own after the wake-up
    leased = {lease.job_id for lease in leases}
    assert leased <= {j.id for j in stored}
    # Only the two it did not take were announced to the workers.
    assert sorted(announced) == sorted(j.id for j in stored if j.id not in leased)
    assert all(app.state.store.get(i).state is JobState.leased for i in leased)


@pytest.mark.parametrize("ends", ["before the hand", "after the hand"])
def test_a_poll_that_ends_without_its_leases_hands_them_back(app: Any, ends: str) -> None:
    """The worker's connection closes while a commit leases for its poll: whether the poll
    ends before the commit hands it the leases or before it takes them, they are released
    at once (not left to expire), and not counted as leased."""
    group = app.state.group_commit
    handoff = group._handoff

    async def scenario() -> None:
        poll = Poll(app, max_jobs=4)
        await poll.waiting()
        claimed = handoff.claim([job(0), job(1)])
        assert [w.worker_id for w in claimed] == [poll.worker_id]
        stored = app.state.store.enqueue([job(0), job(1)])
        leases = handoff.lease(claimed, 2)
        assert len(leases[0]) == 2
        poll.left = True  # its gone() says so from now on
        if ends == "before the hand":
            app.state.notifier.wake(poll.worker_id)
            assert await asyncio.wait_for(poll.task, 5) == []
            assert handoff.hand(claimed, leases) == set()
        else:  # handed, it wakes, sees that its caller left, and gives them back
            assert handoff.hand(claimed, leases) == {lease.job_id for lease in leases[0]}
            assert await asyncio.wait_for(poll.task, 5) == []
        for _ in range(500):  # released: runnable again at once
            if all(app.state.store.get(j.id).state.value == "queued" for j in stored):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the leases were not handed back")

    asyncio.run(scenario())


def test_a_failed_commit_leaves_the_poll_to_read_the_store(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grouped commit fails (a store hiccup): each submission is then stored alone, and
    the claimed poll, handed nothing, reads the store and finds what is stored by then (the
    rest waits, announced, for the next poll)."""
    store = app.state.store
    real = store.enqueue
    calls: list[int] = []

    def enqueue(jobs: Any) -> Any:
        calls.append(len(jobs))
        if len(calls) == 1:
            raise StoreUnavailable("the database is locked")
        return real(jobs)

    monkeypatch.setattr(store, "enqueue", enqueue)
    group = app.state.group_commit
    claims: list[list[LeaseWaiter]] = []
    claim = group._handoff.claim

    def claiming(jobs: Any) -> list[LeaseWaiter]:
        claims.append(claim(jobs))
        return claims[-1]

    monkeypatch.setattr(group._handoff, "claim", claiming)

    async def scenario() -> list[Lease]:
        poll = Poll(app, max_jobs=4)
        await poll.waiting()
        await asyncio.gather(group.enqueue([job(0)]), group.enqueue([job(1)]))
        return await asyncio.wait_for(poll.task, 5)

    leases = asyncio.run(scenario())
    assert [len(c) for c in claims] == [1]  # the poll was claimed by the commit that failed
    assert calls == [2, 1, 1]
    taken = [lease.payload.args for lease in leases if lease.payload]
    assert taken in ([[0]], [[0], [1]]), taken
    assert store.count_by_state()["queued"] == 2 - len(taken)


def test_only_a_waiting_poll_is_claimed_and_once() -> None:
    """A poll between two reads of the store could take jobs itself: it is woken (by the
    announcement after the commit), not claimed, so it never holds more than its
    ``max_jobs``."""

    async def scenario() -> None:
        notifier = Notifier()
        waiter = LeaseWaiter("w", CAPS, max_jobs=2)
        notifier._lease_waiters.append(waiter)
        runnable = Runnable(FUNCTION, Requirements(gpu="cpu"))
        assert notifier.claim([runnable]) == []  # reading the store
        assert notifier.runnable([runnable]) == 1 and waiter.event.is_set()
        waiter.event.clear()
        waiter.waiting = True
        assert notifier.claim([runnable, runnable]) == [waiter]
        assert notifier.claim([runnable]) == []  # claimed already
        assert notifier.runnable([runnable]) == 0  # nor woken: its commit hands it leases
        assert waiter.hand([]) == [] and waiter.event.is_set()
        assert await waiter.claimed() == [] and waiter.claim is None
        # Handed leases, the poll ends before it takes them: they come back to be released.
        waiter.event.clear()
        assert notifier.claim([runnable]) == [waiter]
        leases = [cast(Lease, "a lease")]
        assert waiter.hand(leases) == []
        assert waiter.leave() == leases
        assert waiter.hand(leases) == leases  # and a late hand to an ended poll, the same

    asyncio.run(scenario())


def test_a_commit_claims_the_poll_the_announcement_would_wake() -> None:
    """The warm model server, full by its last engine report, is reading the store while a
    cold one waits: the request is not leased to the cold one in the commit (which would
    load the model); the announcement wakes the warm one, as it would have anyway."""

    async def scenario() -> None:
        hub, notifier = StreamHub(), Notifier()
        notifier.preference = hub.preference
        hub.engines["warm"] = [EngineState(model="smollm2", loaded=True, device="cpu", active=2)]
        hub.names["warm"], hub.capacity["warm"] = "warm", 2
        caps = Capabilities(
            name="server",
            devices=[Device(kind="cpu", name="cpu")],
            labels={model_label("smollm2"): MODEL_LABEL_VALUE},
            functions={INFERENCE_FUNCTION: function_options(600)},
            serves="models",
            concurrency=2,
        )
        warm, cold = LeaseWaiter("warm", caps, 2), LeaseWaiter("cold", caps, 2)
        notifier._lease_waiters += [cold, warm]
        cold.waiting = True
        request = Runnable(
            INFERENCE_FUNCTION, Requirements(labels={model_label("smollm2"): MODEL_LABEL_VALUE})
        )
        assert notifier.claim([request]) == []
        assert notifier.runnable([request]) == 1 and warm.event.is_set()
        assert not cold.event.is_set() and cold.claim is None
        # Once the warm one waits too, the commit leases for it, not for the cold one.
        warm.event.clear()
        warm.waiting = True
        assert notifier.claim([request]) == [warm]

    asyncio.run(scenario())
