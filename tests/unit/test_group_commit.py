"""Group commit (gateway/group_commit.py) over a real SQLite store: submissions that arrive
together share a transaction and are answered together; one bad submission fails alone; a
steady stream is still answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostgpu.errors import InvalidInput
from hostgpu.functions import Requested, resolve
from hostgpu.gateway.group_commit import GroupCommit
from hostgpu.jobs import Payload
from hostgpu.store import NewJob, Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    yield s
    s.close()


def job(n: int, function: str = "m:f") -> NewJob:
    asked = Requested()
    return NewJob(function, Payload(args=[n]), resolve(function, None, asked), asked, resolved=True)


def test_a_burst_shares_transactions_and_keeps_arrival_order(store: Store) -> None:
    group = GroupCommit(store)

    async def burst() -> list[Any]:
        return await asyncio.gather(*(group.enqueue([job(n)]) for n in range(8)))

    answers = asyncio.run(burst())
    assert [a[0].payload.args for a in answers] == [[n] for n in range(8)]
    assert len({a[0].id for a in answers}) == 8
    # The first commits alone; the seven that arrived meanwhile go in the next one.
    assert group.transactions <= 2
    created = [a[0].created_at for a in answers]
    assert created == sorted(created)
    assert store.count_by_state()["queued"] == 8


def test_the_workers_hear_of_a_burst_before_any_submission_resumes(store: Store) -> None:
    """Announced first, the lease starts while the submissions answer their clients."""
    heard: list[list[str]] = []
    resumed: list[tuple[str, int]] = []

    def announce(jobs: list[Any]) -> None:
        heard.append([j.id for j in jobs])
        raise RuntimeError("a broken announcement must not leave a submission waiting")

    group = GroupCommit(store, on_stored=announce)

    async def one(n: int) -> None:
        [stored] = await group.enqueue([job(n)])
        resumed.append((stored.id, len(heard)))

    async def burst() -> None:
        await asyncio.gather(*(one(n) for n in range(8)))

    asyncio.run(burst())
    assert len(resumed) == 8
    announced = [job_id for ids in heard for job_id in ids]
    assert sorted(announced) == sorted(job_id for job_id, _ in resumed)
    # Each submission resumed after the announcement that held its job.
    for job_id, heard_then in resumed:
        assert any(job_id in ids for ids in heard[:heard_then])


def test_a_lone_submission_commits_at_once(store: Store) -> None:
    group = GroupCommit(store)
    [stored] = asyncio.run(group.enqueue([job(1)]))
    assert group.transactions == 1 and store.get(stored.id).payload == Payload(args=[1])


def test_one_bad_submission_fails_alone(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store error on a grouped commit is retried one submission at a time."""
    real = store.enqueue

    def enqueue(jobs: Any) -> Any:
        if any(j.function == "bad:f" for j in jobs):
            raise InvalidInput("bad:f is refused")
        return real(jobs)

    monkeypatch.setattr(store, "enqueue", enqueue)
    group = GroupCommit(store)

    async def burst() -> list[Any]:
        return await asyncio.gather(
            group.enqueue([job(0)]),
            group.enqueue([job(1)]),
            group.enqueue([job(2, "bad:f")]),
            group.enqueue([job(3)]),
            return_exceptions=True,
        )

    first, second, bad, fourth = asyncio.run(burst())
    assert isinstance(bad, InvalidInput)
    assert [r[0].payload.args for r in (first, second, fourth)] == [[0], [1], [3]]
    assert store.count_by_state()["queued"] == 3


def test_a_steady_stream_is_answered_while_it_lasts(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submissions keep arriving faster than commits (5 ms each, as on a slow disk): the
    burst never drains, and the answers still come every ``max_hold_s``, not at the end."""
    real = store.enqueue

    def slow_enqueue(jobs: Any) -> Any:
        time.sleep(0.005)
        return real(jobs)

    monkeypatch.setattr(store, "enqueue", slow_enqueue)
    group = GroupCommit(store, max_hold_s=0.02)

    async def stream() -> tuple[float, float]:
        started = time.monotonic()
        first_answer: list[float] = []
        tasks = []

        async def submit(n: int) -> None:
            await group.enqueue([job(n)])
            if not first_answer:
                first_answer.append(time.monotonic() - started)

        for n in range(300):
            tasks.append(asyncio.create_task(submit(n)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*tasks)
        return first_answer[0], time.monotonic() - started

    first, total = asyncio.run(stream())
    assert first < total / 2, (first, total)
    assert store.count_by_state()["queued"] == 300
    assert group.transactions < 300
