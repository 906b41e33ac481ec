"""One contract, every backend: the store's guarantees on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from hostgpu.capabilities import Capabilities, Device
from hostgpu.errors import (
    AmbiguousId,
    InvalidInput,
    InvalidTransition,
    LastAdminToken,
    NotFound,
)
from hostgpu.functions import FunctionOptions, Requested, resolve
from hostgpu.jobs import JobError, JobState, Outcome, Payload
from hostgpu.retry import RetryPolicy
from hostgpu.store import JobFilter, NewJob, Store, open_store
from hostgpu.tokens import TokenInfo, hash_token, mint

GB = 1024**3
CPU = Device(kind="cpu", name="Test CPU", memory_bytes=16 * GB)
H100 = Device(kind="cuda", index=0, name="NVIDIA H100 80GB HBM3", memory_bytes=80 * GB)
T4 = Device(kind="cuda", index=0, name="Tesla T4", memory_bytes=16 * GB)
MPS = Device(kind="mps", name="Apple M3 Max", memory_bytes=48 * GB)


def caps(
    *devices: Device, labels: dict[str, str] | None = None, functions=("m:f",)
) -> Capabilities:
    return Capabilities(
        name="w",
        devices=[*devices, CPU],
        labels=labels or {},
        modules=sorted({f.partition(":")[0] for f in functions}),
        functions={f: FunctionOptions() for f in functions},
    )


#: Long enough that enqueue, register and the first lease fit in it on a loaded machine.
FALLBACK_GRACE_S = 1.5


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    s = open_store(
        url, retry=RetryPolicy(base_s=0.0, max_lost=1), fallback_grace_s=FALLBACK_GRACE_S
    )
    yield s
    s.close()


def spec(
    function: str = "m:f",
    *,
    payload: Payload | str | None = None,
    idempotency_key: str | None = None,
    resolved: bool = True,
    inputs: tuple[str, ...] = (),
    **requested: object,
) -> NewJob:
    """A job as the gateway hands it to the store (options resolved without a declaration)."""
    asked = Requested.model_validate(requested)
    return NewJob(
        function=function,
        payload=payload,
        options=resolve(function, None, asked),
        requested=asked,
        resolved=resolved,
        idempotency_key=idempotency_key,
        inputs=inputs,
    )


def lease_all(store: Store, c: Capabilities, n: int = 100):  # type: ignore[no-untyped-def]
    wid = store.register_worker(c)
    return wid, store.lease(wid, c, max_jobs=n, lease_seconds=30)


def report(store: Store, lease, status: str, **fields):  # type: ignore[no-untyped-def]
    outcome = Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status=status, **fields)
    return store.report([outcome])[0]


def ok(store: Store, lease, result=None):  # type: ignore[no-untyped-def]
    return report(store, lease, "succeeded", result=result)


def test_enqueue_get_and_count(store: Store) -> None:
    jobs = store.enqueue([spec(payload=Payload(args=[i])) for i in range(3)])
    assert [j.state for j in jobs] == [JobState.queued] * 3
    assert store.get(jobs[1].id).payload == Payload(args=[1])
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


def test_idempotency_key_reused_for_another_call_is_refused(store: Store) -> None:
    def call(*args: object, function: str = "m:f", key: str = "k", **kwargs: object) -> NewJob:
        return spec(function, payload={"args": list(args), "kwargs": kwargs}, idempotency_key=key)

    [first] = store.enqueue([call(1, a=1, b=2)])
    [same] = store.enqueue([call(1, b=2, a=1)])  # the same call (keyword order aside)
    assert same.id == first.id
    for other in (call(2, a=1, b=2), call(1, a=1, b=2, function="m:g")):
        with pytest.raises(InvalidInput, match="idempotency key 'k' was first used for another"):
            store.enqueue([call(key="fresh"), other])
    # Within one batch too; and a refused batch stores nothing.
    with pytest.raises(InvalidInput, match="'j'"):
        store.enqueue([call(0, key="j"), call(1, key="j")])
    assert sum(store.count_by_state().values()) == 1
    # Pickled arguments need not pickle alike in another process: only the function counts.
    [pickled] = store.enqueue([spec(payload="gASVBQ==", idempotency_key="p")])
    [again] = store.enqueue([spec(payload="gASVBg==", idempotency_key="p")])
    assert again.id == pickled.id


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
    store.enqueue([spec(gpu=gpu, min_memory_gb=memory)])
    _, leases = lease_all(store, caps(*devices))
    assert [lease.device.torch_device for lease in leases] == ([expected] if expected else [])


def test_labels_must_match(store: Store) -> None:
    store.enqueue([spec(labels={"zone": "lab", "team": "a"})])
    _, none = lease_all(store, caps(labels={"zone": "lab"}))
    assert none == []
    _, some = lease_all(store, caps(labels={"zone": "lab", "team": "a", "extra": "x"}))
    assert len(some) == 1


def test_function_must_be_published_by_worker(store: Store) -> None:
    store.enqueue([spec(function="other.mod:f")])
    _, none = lease_all(store, caps())
    assert none == []
    _, none = lease_all(store, caps(functions=("other.mod:g",)))
    assert none == []
    _, some = lease_all(store, caps(functions=("other.mod:f",)))
    assert len(some) == 1


def test_a_name_with_like_wildcards_matches_literally(store: Store) -> None:
    store.enqueue([spec(gpu="cuda:_"), spec(gpu="cuda:h_00")])
    _, none = lease_all(store, caps(H100, T4))
    assert none == []


def test_fallback_to_cpu_only_when_allowed_and_after_grace(store: Store) -> None:
    strict, lenient = store.enqueue([spec(gpu="mps"), spec(gpu="mps", fallback="cpu")])
    _, early = lease_all(store, caps())
    assert early == []
    time.sleep(FALLBACK_GRACE_S + 0.1)
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
    assert result.lost == [(b.job_id, b.lease_token)]
    with pytest.raises(NotFound):
        store.heartbeat("unknown-worker", [], lease_seconds=30)


def test_retry_with_backoff_then_final_failure(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=1)])
    for attempt in (1, 2):
        _, [lease] = lease_all(store, caps())
        assert lease.attempt == attempt
        report(store, lease, "failed", error=JobError(type="E", message="no"))
    final = store.get(job.id, history=True)
    assert final.state is JobState.failed
    assert final.error and final.error.message.startswith("no")
    assert "retries=1 is used up" in final.error.message
    assert final.failures == 2 and final.lost == 0
    assert [a.outcome for a in final.history or []] == ["retry", "failed"]


def test_non_retryable_failure_is_final(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=5)])
    _, [lease] = lease_all(store, caps())
    report(store, lease, "failed", retryable=False, error=JobError(type="E", message="bad input"))
    assert store.get(job.id).state is JobState.failed


def test_results_are_those_of_finished_jobs_only(store: Store) -> None:
    jobs = store.enqueue([spec(), spec(), spec(), spec()])
    _, leases = lease_all(store, caps(), 3)
    by_job = {lease.job_id: lease for lease in leases}
    done, failed, running = (j for j in jobs if j.id in by_job)
    [queued] = [j for j in jobs if j.id not in by_job]
    ok(store, by_job[done.id], result={"answer": 42})
    report(
        store, by_job[failed.id], "failed", retryable=False, error=JobError(type="E", message="no")
    )
    store.cancel(queued.id)
    asked = [done.id, failed.id, running.id, queued.id, "f" * 32]
    results = {r.id: r for r in store.results(asked)}
    assert set(results) == {done.id, failed.id, queued.id}  # not the running one, nor unknown
    assert results[done.id].state is JobState.succeeded
    assert results[done.id].result == {"answer": 42} and results[done.id].error is None
    assert results[failed.id].state is JobState.failed and results[failed.id].attempts == 1
    error = results[failed.id].error
    assert error is not None and error.type == "E" and error.message.startswith("no")
    assert results[queued.id].state is JobState.cancelled
    assert results[done.id].function == done.function
    assert store.results([]) == []


def test_rows_stored_with_lone_surrogates_read_back_as_text(store: Store) -> None:
    # Rows stored before the gateway refused lone surrogates hold them as JSON escapes; read
    # back as they are, every response showing them failed (UnicodeEncodeError, a 500).
    [job] = store.enqueue([spec()])
    worker_id = store.register_worker(caps())
    capabilities = store.get_worker(worker_id).capabilities.model_dump_json()
    with store.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.execute(
            text("UPDATE jobs SET payload = :p, result = :r, state = 'succeeded' WHERE id = :id"),
            {
                "p": '{"args":["caf\\udce9"],"kwargs":{}}',
                "r": '"\\udcff\\ud83d\\ude00"',
                "id": job.id,
            },
        )
        conn.execute(
            text("UPDATE workers SET capabilities = :c WHERE id = :id"),
            {"c": capabilities.replace('"name":"w"', '"name":"w\\udcff"'), "id": worker_id},
        )
    listed, _ = store.list_jobs()
    for read in (listed[0], store.get(job.id, history=True)):
        assert read.payload is not None and read.payload.args == ["caf\\udce9"]  # type: ignore[union-attr]
        assert read.result == "\\udcff\U0001f600"  # a pair is text: kept
        read.model_dump_json()  # raised UnicodeEncodeError
    assert store.results([job.id])[0].result == "\\udcff\U0001f600"
    [worker] = store.list_workers()
    assert worker.capabilities.name == "w\\udcff"
    worker.model_dump_json()


def test_unknown_ids(store: Store) -> None:
    [job] = store.enqueue([spec()])
    nobody, other = "0" * 32, "1" * 32
    assert store.unknown([nobody, job.id, other, nobody]) == [nobody, other]
    assert store.unknown([job.id]) == [] and store.unknown([]) == []


def test_release_does_not_count_an_attempt(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=0)])
    _, [lease] = lease_all(store, caps())
    report(store, lease, "released")
    again = store.get(job.id)
    assert again.state is JobState.queued and again.attempts == 0


def test_lost_leases_have_their_own_limit(store: Store) -> None:
    """A worker dying is not the job's failure: retries=0 survives a lost lease; the separate
    lost-lease limit (1 in this store) ends the job on the second loss, and says so."""
    [job] = store.enqueue([spec(max_retries=0)])
    for _ in range(2):
        wid, [lease] = lease_all(store, caps())
        store.heartbeat(wid, [(lease.job_id, lease.lease_token)], lease_seconds=-1)
        assert store.requeue_expired() == 1
        if store.get(job.id).state is JobState.queued:
            assert store.get(job.id).failures == 0
    final = store.get(job.id)
    assert final.state is JobState.failed and final.lost == 2 and final.failures == 0
    assert final.error and final.error.type == "LeaseExpired" and final.error.kind == "lost"
    assert "HOSTGPU_MAX_LOST_LEASES=1 is used up" in final.error.message


def test_a_garbage_lease_token_is_an_unknown_lease(store: Store) -> None:
    [job] = store.enqueue([spec()])
    _, [lease] = lease_all(store, caps())
    forged = Outcome(job_id=job.id, lease_token="0" * 32, status="succeeded", result=1)
    [refused] = store.report([forged])
    assert not refused.accepted and (refused.reason or "").startswith("unknown lease")
    assert ok(store, lease, 2).accepted


def test_cancel(store: Store) -> None:
    queued, running = store.enqueue([spec(priority=-1), spec(priority=1)])
    _, [lease] = lease_all(store, caps(), n=1)
    assert lease.job_id == running.id
    assert store.cancel(queued.id).state is JobState.cancelled
    assert store.cancel(running.id).state is JobState.cancelled
    [attempt] = store.get(running.id, history=True).history or []
    assert attempt.outcome == "cancelled" and attempt.finished_at is not None
    assert not ok(store, lease).accepted
    with pytest.raises(InvalidTransition):
        store.cancel(queued.id)


def test_started_marks_running(store: Store) -> None:
    [job] = store.enqueue([spec()])
    _, [lease] = lease_all(store, caps())
    store.report([Outcome(job_id=job.id, lease_token=lease.lease_token, status="started")])
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


def add_token(store: Store, scope: str = "submit", **kw: object) -> tuple[object, str]:
    info, secret = mint("ci", scope, now=time.time(), **kw)  # type: ignore[arg-type]
    store.add_token(info, hash_token(secret))
    return info, secret


def test_tokens_hashed_verified_and_revoked(store: Store) -> None:
    info, secret = add_token(store)
    assert secret not in str(store.list_tokens())
    assert store.verify_token(hash_token(secret)) == info
    assert store.verify_token(hash_token(secret + "x")) is None
    store.revoke_token(info.id)  # type: ignore[attr-defined]
    assert store.verify_token(hash_token(secret)) is None
    with pytest.raises(NotFound):
        store.revoke_token("nope")


def test_expired_tokens_stop_working(store: Store) -> None:
    _, secret = add_token(store, expires_at=time.time() - 1)
    assert store.verify_token(hash_token(secret)) is None


def test_the_last_admin_token_is_not_revoked_without_force(store: Store) -> None:
    first, _ = add_token(store, "admin")
    assert store.has_active_admin()
    with pytest.raises(LastAdminToken):
        store.revoke_token(first.id)  # type: ignore[attr-defined]
    second, _ = add_token(store, "admin")
    store.revoke_token(first.id)  # type: ignore[attr-defined]
    with pytest.raises(LastAdminToken):
        store.revoke_token(second.id)  # type: ignore[attr-defined]
    store.revoke_token(second.id, force=True)  # type: ignore[attr-defined]
    assert not store.has_active_admin()


def test_pending_jobs_wait_for_a_declaration(store: Store) -> None:
    waiting, rejected = store.enqueue(
        [spec(resolved=False, timeout_s=5.0), spec("m:g", resolved=False)]
    )
    _, none = lease_all(store, caps(functions=("m:f", "m:g")))
    assert none == []
    assert {p.job_id for p in store.pending()} == {waiting.id, rejected.id}
    [pending] = [p for p in store.pending() if p.job_id == waiting.id]
    assert pending.requested.timeout_s == 5.0
    declared = FunctionOptions(gpu="mps", timeout=60)
    error = JobError(type="NotPublished", message="m:g is not a hostgpu function", kind="forbidden")
    assert (
        store.resolve(
            [(waiting.id, resolve("m:f", declared, pending.requested)), (rejected.id, error)]
        )
        == 2
    )
    settled = store.get(waiting.id)
    assert settled.resolved and settled.requirements.gpu == "mps" and settled.timeout_s == 5.0
    assert store.get(rejected.id).state is JobState.failed
    assert store.pending() == []
    _, none = lease_all(store, caps(functions=("m:f",)))
    assert none == []  # it needs mps now
    _, [lease] = lease_all(store, caps(MPS, functions=("m:f",)))
    assert lease.job_id == waiting.id


def test_registration_publishes_declarations(store: Store) -> None:
    c = caps(functions=("m:f", "m:g"))
    c.functions["m:f"] = FunctionOptions(gpu="mps", retries=0)
    store.register_worker(c)
    found = store.declarations(["m:f", "m:g", "m:unknown"])
    assert found["m:f"].gpu == "mps" and found["m:f"].retries == 0
    assert set(found) == {"m:f", "m:g"}
    c.functions["m:f"] = FunctionOptions(gpu="cuda")  # a newer version of the function
    store.register_worker(c)
    assert store.declarations(["m:f"])["m:f"].gpu == "cuda"


def test_ids_by_unique_prefix(store: Store) -> None:
    jobs = store.enqueue([spec() for _ in range(40)])
    job = jobs[0]
    assert store.get(job.id[:8]).id == job.id
    assert store.cancel(job.id[:10]).state is JobState.cancelled
    first = {j.id[0] for j in jobs}
    shared = next(c for c in first if sum(j.id[0] == c for j in jobs) > 1)
    with pytest.raises(AmbiguousId):
        store.get(shared)
    with pytest.raises(NotFound):
        store.get("not-hex")


def test_tokens_revoked_by_unique_prefix(store: Store) -> None:
    """As jobs are found: a unique prefix names a token; an ambiguous one lists the ids."""
    ids = ("abcd0000000000aa", "abcd1000000000bb")
    for n, token_id in enumerate(ids):
        info = TokenInfo(id=token_id, name=f"t{n}", scope="read", created_at=1.0)
        store.add_token(info, hash_token(f"secret {n}"))
    with pytest.raises(AmbiguousId, match=f"'abcd' .*{ids[0]}, {ids[1]}"):
        store.revoke_token("abcd")
    with pytest.raises(NotFound, match="no active token with id 'ffff'"):
        store.revoke_token("ffff")
    assert store.revoke_token("abcd1").id == ids[1]
    # A prefix names active tokens only: a typo cannot hit a revoked one.
    with pytest.raises(NotFound, match="no active token with id 'abcd1'"):
        store.revoke_token("abcd1")
    assert store.revoke_token("abcd").id == ids[0]  # the one active token it starts
    assert store.revoke_token(ids[0]).id == ids[0]  # whole, as before (already revoked)
    assert all(t.revoked_at for t in store.list_tokens())


def test_list_pages_through_a_batch_with_one_timestamp(store: Store) -> None:
    ids = {j.id for j in store.enqueue([spec() for _ in range(25)])}
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list_jobs(limit=10, cursor=cursor)
        seen.extend(j.id for j in page)
        if cursor is None:
            break
    assert len(seen) == 25 and set(seen) == ids
    [_, *rest] = store.enqueue([spec("m:g"), spec("m:g")])
    found, _ = store.list_jobs(JobFilter(function="m:g"))
    assert len(found) == 2
    found, _ = store.list_jobs(JobFilter(state=JobState.queued, id_prefix=rest[0].id[:6]))
    assert rest[0].id in {j.id for j in found}


def test_rerun_a_failed_job(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=0)])
    _, [lease] = lease_all(store, caps())
    report(store, lease, "failed", error=JobError(type="E", message="flaky"))
    assert store.get(job.id).state is JobState.failed
    again = store.rerun(job.id)
    assert again.state is JobState.queued and again.failures == 0 and again.error is None
    with pytest.raises(InvalidTransition):
        store.rerun(job.id)
    _, [lease] = lease_all(store, caps())
    assert lease.attempt == 2


def test_nul_bytes_are_refused_as_bad_input_not_a_crash(store: Store) -> None:
    """PostgreSQL refuses NUL in text: the store says so as bad input (a 4xx), SQLite keeps it."""
    try:
        store.enqueue([spec(idempotency_key="a\x00b")])
    except InvalidInput as exc:
        assert "refused a value" in str(exc)


def test_workers_register_list_and_deregister(store: Store) -> None:
    wid = store.register_worker(caps(MPS))
    assert store.register_worker(caps(MPS), wid) == wid
    [record] = store.list_workers(alive_only=True)
    assert record.alive and record.capabilities.devices[0].kind == "mps"
    store.deregister_worker(wid)
    assert store.list_workers(alive_only=True) == []
    # A gateway that lost its database still accepts the worker's id back.
    assert store.register_worker(caps(), "f" * 32) == "f" * 32


def test_reopen_keeps_everything(store: Store) -> None:
    [job] = store.enqueue([spec()])
    url = store.url  # type: ignore[attr-defined]
    store.close()
    reopened = open_store(url)
    try:
        assert reopened.get(job.id).state is JobState.queued
    finally:
        reopened.close()


# -- requeue and the read-only figures (dashboard, /metrics) ------------------------------------
def test_requeue_takes_a_running_job_back_without_using_a_retry(store: Store) -> None:
    [job] = store.enqueue([spec(max_retries=0)])
    wid, [lease] = lease_all(store, caps())
    report(store, lease, "started")
    again = store.requeue(job.id[:8])
    assert again.state is JobState.queued and again.failures == 0 and again.lost == 0
    assert again.worker_id is None
    # The old holder hears at its next heartbeat, and its late report is refused.
    assert store.heartbeat(wid, [(job.id, lease.lease_token)], lease_seconds=30).lost == [
        (job.id, lease.lease_token)
    ]
    assert not ok(store, lease, 1).accepted
    with pytest.raises(InvalidTransition):
        store.requeue(job.id)  # queued now: nothing to take back
    _, [second] = lease_all(store, caps())
    assert second.attempt == 2 and ok(store, second, 7).accepted
    store.enqueue([spec()])
    _, [held] = lease_all(store, caps())
    assert store.requeue(held.job_id, delay_s=3600).run_after.timestamp() > time.time() + 3000
    assert lease_all(store, caps())[1] == [], "runnable only after the delay"
    done = store.get(job.id, history=True)
    assert done.state is JobState.succeeded and done.result == 7
    assert [a.outcome for a in done.history or []] == ["requeued", "succeeded"]
    with pytest.raises(InvalidTransition):
        store.requeue(job.id)
    with pytest.raises(NotFound):
        store.requeue("0123456789abcdef0123456789abcdef")


def test_expire_leases_says_which_jobs_it_took_back(store: Store) -> None:
    [job] = store.enqueue([spec(gpu="cpu")])
    wid, [lease] = lease_all(store, caps())
    store.heartbeat(wid, [(lease.job_id, lease.lease_token)], lease_seconds=-1)
    [expired] = store.expire_leases()
    assert (expired.job_id, expired.function, expired.requirement) == (job.id, "m:f", "cpu")
    assert expired.worker_id == wid and not expired.gave_up
    assert store.expire_leases() == []
    wid, [lease] = lease_all(store, caps())
    store.heartbeat(wid, [(lease.job_id, lease.lease_token)], lease_seconds=-1)
    [expired] = store.expire_leases()  # the store's lost-lease limit is 1: the job gives up
    assert expired.gave_up and store.get(job.id).state is JobState.failed


def test_queue_groups_count_queued_jobs_by_function_and_requirement(store: Store) -> None:
    assert store.queue_groups() == []
    before = time.time()
    store.enqueue([spec(gpu="mps") for _ in range(3)])
    store.enqueue([spec("m:g", gpu="cuda:h100", min_memory_gb=40)])
    store.enqueue([spec(gpu="cpu")])
    store.enqueue([spec(gpu="cpu", max_retries=3)])
    _, [lease] = lease_all(store, caps(), n=1)  # a cpu job (this worker has no mps or cuda)
    store.retry = RetryPolicy(base_s=3600.0, max_s=3600.0)  # type: ignore[attr-defined]
    report(store, lease, "failed", error=JobError(type="E", message="x"))
    groups = {(g.function, g.requirements.describe()): g for g in store.queue_groups()}
    assert set(groups) == {("m:f", "mps"), ("m:g", "cuda:h100 ≥40 GB"), ("m:f", "cpu")}
    mps = groups[("m:f", "mps")]
    assert mps.queued == 3 and mps.delayed == 0 and mps.resolved
    assert before - 1 <= mps.oldest_created_at <= time.time()
    assert mps.oldest_runnable_at is not None and mps.oldest_runnable_at >= before - 1
    cpu = groups[("m:f", "cpu")]
    assert cpu.queued == 2 and cpu.delayed == 1, "the retrying job waits out its backoff"
    assert groups[("m:g", "cuda:h100 ≥40 GB")].requirements.min_memory_gb == 40


def test_throughput_buckets_finished_jobs_with_their_queue_wait(store: Store) -> None:
    start = time.time() - 1
    store.enqueue([spec(max_retries=0) for _ in range(4)])
    _, leases = lease_all(store, caps())
    assert len(leases) == 4
    for lease in leases[:2]:
        assert ok(store, lease).accepted
    report(store, leases[2], "failed", error=JobError(type="E", message="no"))
    store.cancel(leases[3].job_id)
    [queued] = store.enqueue([spec()])
    store.cancel(queued.id)  # cancelled while queued: no attempt, no wait
    buckets = store.throughput(start, 3600)
    assert len(buckets) == 1
    [b] = buckets
    assert (b.succeeded, b.failed, b.cancelled) == (2, 1, 2)
    assert b.start == pytest.approx(start)
    assert b.wait_avg_s is not None and b.wait_max_s is not None
    assert 0 <= b.wait_avg_s <= b.wait_max_s < 60
    assert b.run_avg_s is not None and 0 <= b.run_avg_s < 60
    assert store.throughput(time.time() + 10, 60) == []
    # One bucket per second over the last minute: the four jobs land in one or two buckets.
    fine = store.throughput(time.time() - 60, 1)
    assert sum(x.succeeded for x in fine) == 2 and all(x.start >= start - 60 for x in fine)
    with pytest.raises(InvalidInput):
        store.throughput(start, 0)


def test_worker_load_counts_running_and_recently_finished_jobs(store: Store) -> None:
    store.enqueue([spec() for _ in range(3)])
    c = caps()
    a = store.register_worker(c)
    first = store.lease(a, c, max_jobs=2, lease_seconds=30)
    b = store.register_worker(c)
    [other] = store.lease(b, c, max_jobs=1, lease_seconds=30)
    assert ok(store, first[0]).accepted
    report(store, other, "started")
    loads = {w.worker_id: w for w in store.worker_load(time.time() - 60)}
    assert (loads[a].running, loads[a].succeeded, loads[a].failed) == (1, 1, 0)
    assert (loads[b].running, loads[b].succeeded) == (1, 0)
    later = {w.worker_id: w for w in store.worker_load(time.time() + 10)}
    assert later[a].succeeded == 0 and later[a].running == 1


def test_job_facts_are_the_light_record_of_a_job(store: Store) -> None:
    [job, waiting] = store.enqueue([spec(gpu="cpu"), spec(gpu="mps")])
    wid, [lease] = lease_all(store, caps())
    assert ok(store, lease, 1).accepted
    facts = {f.id: f for f in store.job_facts([job.id, waiting.id, "f" * 32])}
    assert set(facts) == {job.id, waiting.id}
    done = facts[job.id]
    assert (done.function, done.requirement, done.state) == ("m:f", "cpu", "succeeded")
    assert done.device == "cpu" and done.worker_id == wid and not done.fallback_used
    assert done.leased_at is not None and done.finished_at is not None
    assert done.run_after <= done.leased_at <= done.finished_at
    assert facts[waiting.id].leased_at is None and facts[waiting.id].requirement == "mps"
    assert store.job_facts([]) == []


def test_blobs_are_kept_checked_and_pruned_when_no_job_needs_them(store: Store) -> None:
    import hashlib
    import io

    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one chunk
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(InvalidInput, match="hash to"):
        store.put_blob("0" * 64, io.BytesIO(data))
    assert store.blob_info("0" * 64) is None
    info = store.put_blob(digest, io.BytesIO(data))
    assert info.size == len(data)
    assert store.put_blob(digest, io.BytesIO(b"ignored: already there")).size == len(data)
    assert b"".join(store.read_blob(digest)) == data
    spare = os.urandom(100)
    spare_digest = hashlib.sha256(spare).hexdigest()
    store.put_blob(spare_digest, io.BytesIO(spare))
    store.enqueue([spec(inputs=(digest,))])
    _, [lease] = lease_all(store, caps())
    assert lease.inputs == [digest]
    time.sleep(0.05)
    store.prune(0.01)  # the job is queued: its blob stays; the spare one goes
    assert store.blob_info(digest) is not None and store.blob_info(spare_digest) is None
    with pytest.raises(NotFound):
        list(store.read_blob(spare_digest))
    ok(store, lease)
    time.sleep(0.05)
    assert store.prune(0.01) == 1
    assert store.blob_info(digest) is None


def test_a_lease_can_carry_the_workers_sign_of_life(store: Store) -> None:
    c = caps()
    wid = store.register_worker(c)
    seen = store.get_worker(wid).last_seen
    time.sleep(0.05)
    # A fresh contact is left alone (no write); a stale one is renewed, queue empty or not.
    assert store.lease(wid, c, max_jobs=1, lease_seconds=30, touch_older_than=60) == []
    assert store.get_worker(wid).last_seen == seen
    assert store.lease(wid, c, max_jobs=1, lease_seconds=30, touch_older_than=0.01) == []
    assert store.get_worker(wid).last_seen > seen
    [job] = store.enqueue([spec()])
    leased = store.lease(wid, c, max_jobs=1, lease_seconds=30, touch_older_than=60)
    assert [lease.job_id for lease in leased] == [job.id]
    with pytest.raises(NotFound, match="register again"):
        store.lease("f" * 32, c, max_jobs=1, lease_seconds=30, touch_older_than=0)


def test_a_draining_worker_is_listed_as_draining(store: Store) -> None:
    # Every warm stop drains first: listing workers meanwhile must work (it was a 500).
    wid = store.register_worker(caps())
    store.drain_worker(wid)
    [listed] = store.list_workers(alive_only=True)
    assert listed.state == "draining" and listed.alive
    assert store.get_worker(wid).state == "draining"


def test_broadcast_reaches_the_other_stores_in_order(store: Store) -> None:
    """What one gateway broadcasts, every other gateway on the database hears, in order (its
    own come back as echoes); with SQLite there is no other gateway and it is a no-op."""
    from hostgpu.store.interface import MAX_BROADCAST_BYTES

    if not store.shared:
        store.broadcast("stream", ["a", "b"])  # nobody to tell, nothing fails
        return
    other = open_store(store.url)
    heard: list[str] = []
    ready = threading.Event()

    def hear(topic: str) -> None:
        if topic == "resync":
            ready.set()
        heard.append(topic)

    stop = other.subscribe(hear)
    try:
        assert ready.wait(10), "the listener did not connect"
        big = "é" * ((MAX_BROADCAST_BYTES - 100) // 2)
        store.broadcast("stream", ["one", "two:with:colons", big])
        deadline = time.monotonic() + 10
        while len(heard) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert heard == ["resync", "stream:one", "stream:two:with:colons", f"stream:{big}"]
        with pytest.raises(ValueError):
            store.broadcast("stream", ["x" * (MAX_BROADCAST_BYTES + 1)])
    finally:
        stop()
        other.close()
