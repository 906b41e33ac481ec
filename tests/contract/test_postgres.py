"""What only the PostgreSQL store does: leasing past rows another gateway holds, and living
through connections the server dropped (it pings only connections that sat idle)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

import hostgpu.store.postgres as pg
from hostgpu.errors import StoreUnavailable
from hostgpu.jobs import JobState
from hostgpu.store import Store, open_store
from hostgpu.store.sql import SQLStore
from tests.contract.test_store import caps, ok, spec


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    s = open_store(pg_url)
    yield s
    s.close()


def _drop_connections(url: str) -> int:
    """Close every server connection to the test database but this one (a restart's effect
    on a client's pool)."""
    database = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    return int(killed[0]) if killed else 0


def test_a_lease_passes_over_jobs_another_lessee_holds(store: Store, pg_url: str) -> None:
    first, second = store.enqueue([spec(priority=1), spec()])
    c = caps()
    wid = store.register_worker(c)
    with psycopg.connect(pg_url) as other:  # another gateway, mid-lease on the first job
        other.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        started = time.monotonic()
        [lease] = store.lease(wid, c, max_jobs=1, lease_seconds=30)
        assert lease.job_id == second.id  # not the held one, and not nothing
        assert time.monotonic() - started < 2  # skipped, not waited for
    [lease] = store.lease(wid, c, max_jobs=1, lease_seconds=30)  # released: now it is free
    assert lease.job_id == first.id and lease.attempt == 1
    assert ok(store, lease, 1).accepted
    assert store.get(first.id, history=True).history[0].worker_id == wid  # type: ignore[index]


def test_connections_the_server_dropped_are_replaced_when_idle(
    store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "PING_IDLE_S", 0.05)
    [job] = store.enqueue([spec()])
    assert _drop_connections(pg_url) >= 1
    time.sleep(0.1)
    # Every pooled connection is dead; idle ones are pinged, found gone and replaced.
    assert store.get(job.id).state is JobState.queued
    c = caps()
    wid = store.register_worker(c)
    [lease] = store.lease(wid, c, max_jobs=1, lease_seconds=30)
    assert ok(store, lease, 2).accepted


def test_a_connection_dropped_in_use_is_a_retryable_error_not_a_crash(
    store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "PING_IDLE_S", 3600.0)  # nothing is pinged: the drop is seen in use
    [job] = store.enqueue([spec()])
    store.get(job.id)
    assert _drop_connections(pg_url) >= 1
    with pytest.raises(StoreUnavailable, match="try again"):
        store.get(job.id)
    # The pool let go of every old connection: the next call works.
    assert store.get(job.id).state is JobState.queued
    assert store.enqueue([spec()])[0].state is JobState.queued


def test_contending_leases_never_exceed_max_jobs_nor_share_a_job(store: Store, pg_url: str) -> None:
    """Two gateways' stores, eight lessees: a lease that reads again past candidates another
    took still returns at most ``max_jobs``, and every job is leased once."""
    other = open_store(pg_url)
    store.enqueue([spec() for _ in range(300)])
    c = caps()
    seen: list[str] = []
    sizes: list[int] = []
    lock = threading.Lock()

    def drain(s: Store) -> None:
        wid = s.register_worker(c)
        while leases := s.lease(wid, c, max_jobs=4, lease_seconds=30):
            with lock:
                seen.extend(x.job_id for x in leases)
                sizes.append(len(leases))

    threads = [threading.Thread(target=drain, args=(s,)) for s in (store, other) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert max(sizes) <= 4
    assert len(seen) == 300 and len(set(seen)) == 300


def test_a_failed_second_read_keeps_the_leases_already_taken(
    store: Store, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try commits on its own: leases taken before a later try fails are returned, not
    lost to an exception (they would sit leased, unknown to the worker, until expiry)."""
    first, second = store.enqueue([spec(priority=1), spec()])
    c = caps()
    wid = store.register_worker(c)
    reads = 0
    real = SQLStore._picks

    def flaky(self: SQLStore, *args: Any) -> Any:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise OperationalError("SELECT", {}, Exception("connection reset"))
        return real(self, *args)

    monkeypatch.setattr(SQLStore, "_picks", flaky)
    with psycopg.connect(pg_url) as holder:  # the first job is held: the lease reads again
        holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (first.id,))
        leases = store.lease(wid, c, max_jobs=2, lease_seconds=30)
    assert [lease.job_id for lease in leases] == [second.id] and reads == 2


@contextlib.contextmanager
def listening(store: Store, prefix: str) -> Iterator[list[str]]:
    """The topics starting with ``prefix`` that a second store on the database hears (as
    another gateway would), from once its listener is connected."""
    other = open_store(store.url)  # type: ignore[attr-defined]
    heard: list[str] = []
    ready = threading.Event()

    def hear(topic: str) -> None:
        if topic == "resync":
            ready.set()
        elif topic.startswith(prefix):
            heard.append(topic)

    stop = other.subscribe(hear)
    try:
        assert ready.wait(10), "the listener did not connect"
        yield heard
    finally:
        stop()
        other.close()


def test_an_enqueue_tells_other_gateways_what_it_queued(store: Store) -> None:
    """The ``runnable`` event of an enqueue describes its kinds of job (so other gateways wake
    one fitting worker per job); many kinds, or only unresolved jobs, are a bare ``runnable``."""
    import json

    with listening(store, "runnable") as heard:
        store.enqueue([spec(gpu="cuda", priority=1), spec(gpu="cuda"), spec(labels={"a": "b"})])
        store.enqueue([spec(f"m:f{i}") for i in range(20)])  # 20 kinds: no details
        store.enqueue([spec(resolved=False)])
        deadline = time.monotonic() + 10
        while len(heard) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        described, many, unresolved = heard
        kinds = sorted(json.loads(described.removeprefix("runnable:")), key=lambda k: k[3])
        assert [(k[0], k[1].get("gpu"), k[1].get("labels"), k[3]) for k in kinds] == [
            ("m:f", "any", {"a": "b"}, 1),
            ("m:f", "cuda", {}, 2),
        ]
        assert many == unresolved == "runnable"


def test_a_worker_registering_again_tells_other_gateways(store: Store) -> None:
    """They cache its capabilities for their lease polls: ``worker:<id>`` makes them read
    the new ones. A first registration has nothing to replace and says nothing."""
    with listening(store, "worker:") as heard:
        wid = store.register_worker(caps())
        store.register_worker(caps(), wid)
        store.register_worker(caps(), "0" * 32)  # an id the store does not know: a first
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything else would have come by now
        assert heard == [f"worker:{wid}"]
