"""One contract, every backend: the store's guarantees on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostgpu.capabilities import Capabilities, Device
from hostgpu.errors import InvalidTransition, NotFound
from hostgpu.jobs import JobSpec, JobState, Outcome
from hostgpu.store import Store, open_store

GB = 1024**3
CPU = Device(kind="cpu", name="Test CPU", memory_bytes=16 * GB)
H100 = Device(kind="cuda", index=0, name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GB)
T4 = Device(kind="cuda", index=0, name="Tesla T4", memory_bytes=16 * GB)
MPS = Device(kind="mps", name="Apple M3 Max", memory_bytes=48 * GB)


def caps(*devices: Device, labels: dict[str, str] | None = None, modules=("m",)) -> Capabilities:
    return Capabilities(
        name="w", devices=[*devices, CPU], labels=labels or {}, modules=list(modules)
    )


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = open_store(url, retry_base_s=0.0, fallback_grace_s=0.3)
    yield s
    s.close()


def spec(**kw: object) -> JobSpec:
    kw.setdefault("function", "m:f")
    return JobSpec.model_validate(kw)


def lease_all(store: Store, c: Capabilities, n: int = 100):  # type: ignore[no-untyped-def]
    wid = store.register_worker(c)
    return wid, store.lease(wid, c, max_jobs=n, lease_seconds=30)


def report(store: Store, lease, status: str, **fields):  # type: ignore[no-untyped-def]
    outcome = Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status=status, **fields)
    return store.report("w", [outcome])[0]


def ok(store: Store, lease, result=None):  # type: ignore[no-untyped-def]
    return report(store, lease, "succeeded", result=result)


def test_enqueue_get_and_count(store: Store) -> None:
    jobs = store.enqueue([spec(payload={"args": [i]}) for i in range(3)])
    assert [j.state for j in jobs] == [JobState.queued] * 3
    assert store.get(jobs[1].id).payload == {"args": [1]}
    assert store.count_by_state()["queued"] == 3
    with pytest.raises(NotFound):
        store.get("missing")


def test_idempotency_key_returns_existing_job(store: Store) -> None:
    [first] = store.enqueue([spec(idempotency_key="k1")])
    [again, other] = store.enqueue([spec(idempotency_key="k1"), spec(idempotency_key="k2")])
    assert again.id == first.id
    assert other.id != first.id
    [twice_a, twice_b] = store.enqueue([spec(idempotency_key="k3"), spec(idempotency_key="k3")])
    assert twice_a.id == twice_b.id
    assert sum(store.count_by_state().values()) == 3


@pytest.mark.parametrize(
    ("gpu", "memory", "devices", "expected"),
    [
        ("mps", None, (MPS,), "mps"),
        ("mps", None, (H100,), None),
        ("cuda", None, (MPS,), None),
        ("cuda", None, (H100,), "cuda:0"),
        ("cuda:h100", None, (T4,), None),
        ("cuda:H100", None, (H100,), "cuda:0"),
        ("gpu", None, (), None),
        ("gpu", None, (MPS,), "mps"),
        ("cpu", None, (H100,), "cpu"),
        ("any", None, (H100,), "cuda:0"),
        ("any", None, (), "cpu"),
        ("cuda", 40, (T4,), None),
        ("cuda", 40, (H100,), "cuda:0"),
    ],
)
def test_requirement_matching(
    store: Store, gpu: str, memory: float | None, devices: tuple[Device, ...], expected: str | None
) -> None:
    store.enqueue([spec(requirements={"gpu": gpu, "min_memory_gb": memory})])
    _, leases = lease_all(store, caps(*devices))
    assert [lease.device.torch_device for lease in leases] == ([expected] if expected else [])


def test_labels_must_match(store: Store) -> None:
    store.enqueue([spec(requirements={"labels": {"zone": "lab", "team": "a"}})])
    _, none = lease_all(store, caps(labels={"zone": "lab"}))
    assert none == []
    _, some = lease_all(store, caps(labels={"zone": "lab", "team": "a", "extra": "x"}))
    assert len(some) == 1


def test_module_must_be_imported_by_worker(store: Store) -> None:
    store.enqueue([spec(function="other.mod:f")])
    _, none = lease_all(store, caps())
    assert none == []
    _, some = lease_all(store, caps(modules=("other.mod",)))
    assert len(some) == 1


def test_fallback_to_cpu_only_when_allowed_and_after_grace(store: Store) -> None:
    strict, lenient = store.enqueue(
        [spec(requirements={"gpu": "mps"}), spec(requirements={"gpu": "mps"}, fallback="cpu")]
    )
    _, early = lease_all(store, caps())
    assert early == []
    time.sleep(0.4)
    _, later = lease_all(store, caps())
    assert [(x.job_id, x.fallback_used, x.device.kind) for x in later] == [
        (lenient.id, True, "cpu")
    ]
    ok(store, later[0])
    assert store.get(lenient.id).fallback_used is True
    assert store.get(strict.id).state is JobState.queued


def test_priority_then_age(store: Store) -> None:
    low, high, mid = store.enqueue([spec(priority=0), spec(priority=10), spec(priority=5)])
    _, leases = lease_all(store, caps(), n=3)
    assert [x.job_id for x in leases] == [high.id, mid.id, low.id]


def test_lease_fencing_refuses_stale_completion(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=3)])
    wid, [first] = lease_all(store, caps())
    # Simulate the worker going silent: expire its lease and take the job back.
    store.heartbeat(wid, [(first.job_id, first.lease_token)], lease_seconds=-1)
    assert store.requeue_expired() == 1
    _, [second] = lease_all(store, caps())
    assert second.lease_token != first.lease_token
    late = ok(store, first, "late")
    assert not late.accepted and "lease lost" in (late.reason or "")
    assert ok(store, second, "fresh").accepted
    again = ok(store, second, "twice")
    assert not again.accepted
    final = store.get(job.id, history=True)
    assert final.state is JobState.succeeded and final.result == "fresh"
    assert [a.outcome for a in final.history or []] == ["lost", "succeeded"]


def test_heartbeat_extends_and_reports_lost(store: Store) -> None:
    store.enqueue([spec(), spec()])
    wid, [a, b] = lease_all(store, caps(), n=2)
    store.cancel(b.job_id)
    result = store.heartbeat(
        wid, [(a.job_id, a.lease_token), (b.job_id, b.lease_token)], lease_seconds=30
    )
    assert result.lost == [b.job_id]
    with pytest.raises(NotFound):
        store.heartbeat("unknown-worker", [], lease_seconds=30)


def test_retry_with_backoff_then_final_failure(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=1)])
    for attempt in (1, 2):
        _, [lease] = lease_all(store, caps())
        assert lease.attempt == attempt
        report(store, lease, "failed", error={"type": "E", "message": "no"})
    final = store.get(job.id, history=True)
    assert final.state is JobState.failed
    assert final.error and final.error["message"] == "no"
    assert [a.outcome for a in final.history or []] == ["retry", "failed"]


def test_non_retryable_failure_is_final(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=5)])
    _, [lease] = lease_all(store, caps())
    report(store, lease, "failed", retryable=False, error={"type": "E", "message": "bad input"})
    assert store.get(job.id).state is JobState.failed


def test_release_does_not_count_an_attempt(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=0)])
    _, [lease] = lease_all(store, caps())
    report(store, lease, "released")
    again = store.get(job.id)
    assert again.state is JobState.queued and again.attempts == 0


def test_expired_lease_without_retries_fails(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=0)])
    wid, [lease] = lease_all(store, caps())
    store.heartbeat(wid, [(lease.job_id, lease.lease_token)], lease_seconds=-1)
    store.requeue_expired()
    final = store.get(job.id)
    assert final.state is JobState.failed and final.error and final.error["type"] == "LeaseExpired"


def test_cancel(store: Store) -> None:
    queued, running = store.enqueue([spec(priority=-1), spec(priority=1)])
    _, [lease] = lease_all(store, caps(), n=1)
    assert lease.job_id == running.id
    assert store.cancel(queued.id).state is JobState.cancelled
    assert store.cancel(running.id).state is JobState.cancelled
    assert not ok(store, lease).accepted
    with pytest.raises(InvalidTransition):
        store.cancel(queued.id)


def test_started_marks_running(store: Store) -> None:
    [job] = store.enqueue([spec()])
    _, [lease] = lease_all(store, caps())
    store.report("w", [Outcome(job_id=job.id, lease_token=lease.lease_token, status="started")])
    assert store.get(job.id).state is JobState.running
    assert ok(store, lease, 1).accepted


def test_concurrent_lessees_never_share_a_job(store: Store) -> None:
    store.enqueue([spec() for _ in range(300)])
    c = caps()
    seen: list[str] = []
    lock = threading.Lock()

    def drain() -> None:
        wid = store.register_worker(c)
        while True:
            leases = store.lease(wid, c, max_jobs=7, lease_seconds=30)
            if not leases:
                return
            with lock:
                seen.extend(x.job_id for x in leases)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 300 and len(set(seen)) == 300


def test_prune_removes_only_old_finished_jobs(store: Store) -> None:
    done, waiting = store.enqueue([spec(priority=1), spec()])
    _, [lease] = lease_all(store, caps(), n=1)
    ok(store, lease)
    time.sleep(0.05)
    assert store.prune(3600) == 0
    assert store.prune(0.01) == 1
    with pytest.raises(NotFound):
        store.get(done.id)
    assert store.get(waiting.id).state is JobState.queued


def test_tokens_hashed_verified_and_revoked(store: Store) -> None:
    info, secret = store.create_token("ci", "submit")
    assert secret not in str(store.list_tokens())
    assert store.verify_token(secret) == info
    assert store.verify_token(secret + "x") is None
    store.revoke_token(info.id)
    assert store.verify_token(secret) is None
    with pytest.raises(NotFound):
        store.revoke_token("nope")


def test_workers_register_list_and_deregister(store: Store) -> None:
    wid = store.register_worker(caps(MPS))
    assert store.register_worker(caps(MPS), wid) == wid
    [record] = store.list_workers(alive_only=True)
    assert record.alive and record.capabilities.devices[0].kind == "mps"
    store.deregister_worker(wid)
    assert store.list_workers(alive_only=True) == []
    # A gateway that lost its database still accepts the worker's id back.
    assert store.register_worker(caps(), "fixed-id") == "fixed-id"


def test_reopen_keeps_everything(store: Store) -> None:
    [job] = store.enqueue([spec()])
    url = store.url  # type: ignore[attr-defined]
    store.close()
    reopened = open_store(url)
    try:
        assert reopened.get(job.id).state is JobState.queued
    finally:
        reopened.close()
