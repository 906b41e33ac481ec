"""The child-process pool of the native worker, with real spawned children (no mocks)."""

from __future__ import annotations

import base64
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # children inherit sys.path (spawn) and import tests.jobfuncs
    sys.path.insert(0, str(ROOT))

from hostgpu.capabilities import Device  # noqa: E402
from hostgpu.jobs import Lease, Outcome  # noqa: E402
from hostgpu.worker import output  # noqa: E402
from hostgpu.worker.output import DEFAULT_JOB_OUTPUT_BYTES  # noqa: E402
from hostgpu.worker.runner import ChildPool  # noqa: E402

F = "tests.jobfuncs:"


class Collector:
    """on_result callback that lets a test wait for specific jobs."""

    def __init__(self) -> None:
        self.results: dict[str, Outcome] = {}
        self.threads: set[str] = set()
        self._cond = threading.Condition()

    def __call__(self, result: Outcome) -> None:
        with self._cond:
            assert result.job_id not in self.results, f"{result.job_id} reported twice"
            self.results[result.job_id] = result
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def wait(self, *job_ids: str, timeout: float = 15.0) -> list[Outcome]:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(j in self.results for j in job_ids), timeout)
            assert ok, f"no result for {[j for j in job_ids if j not in self.results]}"
            return [self.results[j] for j in job_ids]


_counter = iter(range(10**9))


def task(
    function: str,
    *args: Any,
    timeout: float = 30.0,
    device: str = "cpu",
    serializer: str = "json",
    payload: Any = "default",
    **kwargs: Any,
) -> Lease:
    if payload == "default":
        payload = {"args": list(args), "kwargs": kwargs} if (args or kwargs) else None
    kind, _, index = device.partition(":")
    # model_construct: the pool must cope with what the gateway would never let through.
    return Lease.model_construct(
        job_id=f"{next(_counter):032x}",  # a real id's shape: 32 hex digits
        lease_token="tok",
        attempt=1,
        function=function if ":" in function else F + function,
        payload=payload,
        serializer=serializer,
        timeout_s=timeout,
        device=Device(kind=kind, index=int(index) if index else None, name=kind),  # type: ignore[arg-type]
        fallback_used=False,
        lease_expires_at=datetime.now(UTC),
    )


PoolFactory = Callable[..., tuple[ChildPool, Collector]]


@pytest.fixture
def make_pool() -> Iterator[PoolFactory]:
    pools: list[ChildPool] = []

    def factory(concurrency: int = 1, **kw: Any) -> tuple[ChildPool, Collector]:
        collector = Collector()
        pool = ChildPool(concurrency, collector, **kw)
        pool.start()
        pools.append(pool)
        return pool, collector

    yield factory
    for pool in pools:
        pool.stop(cold=True)


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[ChildPool, Collector]]:
    """One warm pool for the tests that leave their children alive."""
    collector = Collector()
    pool = ChildPool(1, collector, preload=["tests.jobfuncs"])
    pool.start()
    yield pool, collector
    assert pool.stop() == []


def run1(pool_and_collector: tuple[ChildPool, Collector], t: Lease) -> Outcome:
    pool, collector = pool_and_collector
    pool.submit(t)
    return collector.wait(t.job_id)[0]


def test_success_with_args_and_kwargs(shared: tuple[ChildPool, Collector]) -> None:
    r = run1(shared, task("add", 2, 3, scale=10))
    assert r.status == "succeeded", r.error
    assert r.result == 50
    assert r.error is None
    assert r.lease_token == "tok"
    assert r.device == "cpu"
    assert set(r.timings) == {"queue_s", "import_s", "run_s", "total_s"}
    assert r.timings["total_s"] >= r.timings["run_s"] >= 0
    # no payload at all and qualnames with dots
    assert run1(shared, task("noop")).status == "succeeded"
    r = run1(shared, task("Namespace.Inner.hello", "you"))
    assert r.result == "hello you"
    # on_result runs on the supervisor thread
    assert shared[1].threads == {"hostgpu-child-supervisor"}


def test_device_and_job_id_inside_the_job(shared: tuple[ChildPool, Collector]) -> None:
    t = task("device", device="cuda:1")
    r = run1(shared, t)
    assert r.result == "cuda:1"
    assert r.device == "cuda:1"
    t = task("job_id")
    assert run1(shared, t).result == t.job_id
    assert run1(shared, task("device", device="mps")).result == "mps"


def test_warm_reuse(shared: tuple[ChildPool, Collector]) -> None:
    first = run1(shared, task("pid"))
    second = run1(shared, task("pid"))
    assert first.result == second.result != os.getpid()
    assert second.timings["import_s"] < 0.001
    # module-level state (a "loaded model") survives between jobs
    loads = [run1(shared, task("load_model")).result for _ in range(3)]
    assert loads == [loads[0], loads[0] + 1, loads[0] + 2]


def test_cold_import_is_timed(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(1)  # no preload: the first job imports its module
    t1, t2 = task("pid"), task("pid")
    pool.submit(t1)
    pool.submit(t2)
    r1, r2 = collector.wait(t1.job_id, t2.job_id)
    assert r1.timings["import_s"] > 0
    assert r2.timings["import_s"] == 0.0
    assert r1.result == r2.result


def test_exception_has_type_message_and_traceback(shared: tuple[ChildPool, Collector]) -> None:
    r = run1(shared, task("boom", "it broke"))
    assert r.status == "failed"
    assert r.retryable is True
    assert r.error is not None
    assert r.error.kind == "exception"
    assert r.error.type == "ValueError"
    assert r.error.message == "it broke"
    assert "_inner_boom" in r.error.traceback
    assert "boom" in r.error.traceback
    assert "ValueError: it broke" in r.error.traceback
    assert run1(shared, task("add", 1, 1)).result == 2  # the child lives on


def test_import_errors_are_not_retryable(shared: tuple[ChildPool, Collector]) -> None:
    for function, needle in [
        ("tests.no_such_module:f", "tests.no_such_module"),
        ("tests.jobfuncs:", "package.module:qualname"),
    ]:
        r = run1(shared, task(function))
        assert r.status == "failed"
        assert r.error is not None
        assert r.error.kind == "import", r.error
        assert needle in r.error.message
        assert r.retryable is False


@pytest.mark.parametrize(
    "function",
    [
        "hostgpu.builtin:os.system",
        "tests.jobfuncs:os.system",
        "tests.jobfuncs:subprocess.run",
        "tests.jobfuncs:builtins.eval",
        "tests.jobfuncs:Namespace",  # a class
        "tests.jobfuncs:LOADS",  # a module attribute
        "tests.jobfuncs:time.sleep",  # another module's function
        "tests.jobfuncs:unpublished",  # a plain function of the module
        "tests.jobfuncs:no_such_function",
    ],
)
def test_only_published_functions_run(
    shared: tuple[ChildPool, Collector], function: str, tmp_path: Path
) -> None:
    """The trust boundary: a job names a published function, or nothing runs."""
    marker = tmp_path / "ran"
    r = run1(shared, task(function, str(marker)))
    assert r.status == "failed"
    assert r.error is not None and r.error.kind == "forbidden", r.error
    assert r.error.message.startswith(f"{function} is not a hostgpu function")
    assert r.retryable is False
    assert not marker.exists()


def test_bad_json_payload(shared: tuple[ChildPool, Collector]) -> None:
    r = run1(shared, task("add", payload=[1, 2]))
    assert r.error is not None and r.error.kind == "serialization"
    assert r.retryable is False
    r = run1(shared, task("add", payload={"args": [1, 2]}, serializer="yaml"))
    assert r.error is not None and "unknown serializer" in r.error.message


def test_non_json_result(shared: tuple[ChildPool, Collector]) -> None:
    r = run1(shared, task("not_json"))
    assert r.status == "failed"
    assert r.error is not None
    assert r.error.kind == "serialization"
    assert "set" in r.error.message and "JSON" in r.error.message
    assert r.retryable is False
    r = run1(shared, task("nan"))
    assert r.error is not None and r.error.kind == "serialization"


def test_result_size_is_measured_as_the_gateway_measures() -> None:
    from hostgpu.worker import child

    items = [0] * 1000  # 2,001 bytes of compact JSON; 3,000 with ", " between items
    assert child._encode_result("m:f", items, "json", 2001) == items
    with pytest.raises(child._Refused, match="the result is 2001 bytes, over the gateway's limit"):
        child._encode_result("m:f", items, "json", 2000)


def _pickled(*args: Any, **kwargs: Any) -> str:
    return base64.b64encode(pickle.dumps((args, kwargs))).decode()


def test_pickle_only_for_functions_that_opted_in(shared: tuple[ChildPool, Collector]) -> None:
    # a plain function: refused before anything is unpickled
    r = run1(shared, task("add", serializer="pickle", payload=_pickled(1, 2)))
    assert r.status == "failed"
    assert r.error is not None
    assert r.error.kind == "serialization"
    assert 'serializer="pickle"' in r.error.message
    assert "trusted" in r.error.message
    assert r.retryable is False
    # another function declared with serializer="json": refused too
    r = run1(shared, task("json_pair", serializer="pickle", payload=_pickled(1, 2)))
    assert r.error is not None and r.error.kind == "serialization"
    # ... but its JSON arguments work
    r = run1(shared, task("json_pair", 1, 2))
    assert r.result == {"sum": 3, "type": "int"}
    # a wrapper that opted in: arguments and result travel pickled
    r = run1(shared, task("pickled_double", serializer="pickle", payload=_pickled(1 + 2j)))
    assert r.status == "succeeded", r.error
    assert pickle.loads(base64.b64decode(r.result)) == 2 + 4j
    # garbage instead of base64
    r = run1(shared, task("pickled_double", serializer="pickle", payload="%%%"))
    assert r.error is not None and r.error.kind == "serialization"


def test_timeout_kills_the_child_and_the_next_job_runs(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    first_pid = run1((pool, collector), task("pid")).result
    slow, after = task("sleep", 30, timeout=0.5), task("pid")
    started = time.monotonic()
    pool.submit(slow)
    pool.submit(after)
    r_slow, r_after = collector.wait(slow.job_id, after.job_id)
    assert time.monotonic() - started < 10
    assert r_slow.status == "failed"
    assert r_slow.error is not None
    assert r_slow.error.kind == "timeout"
    assert r_slow.error.message == "job exceeded its timeout of 0.5 s and was killed"
    assert r_slow.retryable is True
    assert r_after.status == "succeeded"
    assert r_after.result != first_pid  # a replacement child ran it


@pytest.mark.parametrize(
    ("function", "args", "needle"),
    [("hard_exit", (3,), "exited with code 3"), ("segfault", (), "died with SIGSEGV")],
)
def test_crash_is_reported_and_the_pool_survives(
    make_pool: PoolFactory, function: str, args: tuple[Any, ...], needle: str
) -> None:
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    crash, after = task(function, *args), task("add", 1, 2)
    pool.submit(crash)
    pool.submit(after)
    r_crash, r_after = collector.wait(crash.job_id, after.job_id)
    assert r_crash.status == "failed"
    assert r_crash.error is not None
    assert r_crash.error.kind == "crash"
    assert needle in r_crash.error.message
    assert "while running the job" in r_crash.error.message
    assert r_crash.retryable is True
    if function == "segfault":  # faulthandler's dump of the dying child
        assert "segfault" in r_crash.error.traceback
    assert r_after.result == 3


def test_a_jobs_output_is_bounded_in_the_workers_log(
    make_pool: PoolFactory, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # The children write into the worker's own stdout and stderr (here, capfd's files):
    # 32 MiB to each must not all land there, nor stall the job, nor cost it its result.
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    loud, quiet = task("shout", 32 << 20, line="first line"), task("shout", 10, line="quiet")
    started = time.monotonic()
    assert run1((pool, collector), loud).result == "done"
    assert time.monotonic() - started < 10
    assert run1((pool, collector), quiet).result == "done"  # its own allowance
    assert output.flush()  # the worker writes what it keeps from a thread of its own
    out, err = capfd.readouterr()
    limit = DEFAULT_JOB_OUTPUT_BYTES
    assert len(out) + len(err) <= limit + 2 + len("quiet\n") + 2 * 10
    assert out.startswith("first line\n")  # the first bytes are kept, in order
    assert out.endswith("quiet\n" + "x" * 10) and err.endswith("x" * 10)
    total = len("first line\n") + 2 * (32 << 20)
    left_out = f"{total - limit:,} bytes were left out (HOSTGPU_JOB_OUTPUT_BYTES)"
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert warnings == [
        f"job {loud.job_id} wrote {total:,} bytes to stdout and stderr: "
        f"the first {limit:,} are in this log, {left_out}"
    ]


def test_cancel_running_and_queued(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    child_pid = run1((pool, collector), task("pid")).result  # the child is up
    running, queued, after = task("sleep", 30), task("sleep", 30), task("pid")
    for t in (running, queued, after):
        pool.submit(t)
    assert pool.free_slots() == 0
    time.sleep(0.3)  # let the child pick the first one up
    assert [t.job_id for t in pool.running()] == [running.job_id, queued.job_id, after.job_id]
    assert pool.cancel(queued.job_id) is True
    assert pool.cancel(running.job_id) is True
    assert pool.cancel("no-such-job") is False
    r_running, r_queued, r_after = collector.wait(running.job_id, queued.job_id, after.job_id)
    for r in (r_running, r_queued):
        assert r.status == "failed"
        assert r.error is not None and r.error.kind == "cancelled"
        assert r.retryable is False
    assert r_after.status == "succeeded"
    assert r_after.result != child_pid  # the cancelled job's child was killed and replaced
    assert pool.wait_idle(5)
    assert pool.running() == []
    assert pool.free_slots() == 1


def test_concurrency_runs_jobs_in_parallel(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(2, preload=["tests.jobfuncs"])
    for t in (task("noop"), task("noop")):  # warm both children
        pool.submit(t)
    assert pool.wait_idle(15)
    a, b = task("sleep_pid", 1.0), task("sleep_pid", 1.0)
    started = time.monotonic()
    pool.submit(a)
    pool.submit(b)
    assert pool.free_slots() == 0
    ra, rb = collector.wait(a.job_id, b.job_id)
    elapsed = time.monotonic() - started
    assert elapsed < 1.8, elapsed
    assert ra.result != rb.result


def test_warm_stop_finishes_running_job(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    run1((pool, collector), task("noop"))  # the child is up
    running, queued = task("sleep", 0.5), task("noop")
    pool.submit(running)
    pool.submit(queued)
    time.sleep(0.2)
    unfinished = pool.stop(grace=10)
    assert [t.job_id for t in unfinished] == [queued.job_id]  # handed back, not run
    assert collector.results[running.job_id].status == "succeeded"
    assert queued.job_id not in collector.results
    with pytest.raises(RuntimeError):
        pool.submit(task("noop"))


def test_cold_stop_returns_unfinished_tasks(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(2, preload=["tests.jobfuncs"])
    tasks = [task("sleep", 30) for _ in range(3)]
    for t in tasks:
        pool.submit(t)
    time.sleep(0.5)
    started = time.monotonic()
    unfinished = pool.stop(cold=True)
    assert time.monotonic() - started < 5
    assert sorted(t.job_id for t in unfinished) == sorted(t.job_id for t in tasks)
    assert collector.results == {}


def test_grace_exceeded_kills_and_returns(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(1, preload=["tests.jobfuncs"])
    t = task("sleep", 30)
    pool.submit(t)
    deadline = time.monotonic() + 30  # a loaded machine takes a while to spawn the child
    while not (busy := [c.pid for c in pool._children if c.task is not None]):
        assert time.monotonic() < deadline, "the task never reached a child"
        time.sleep(0.05)
    assert all(busy)
    started = time.monotonic()
    assert [u.job_id for u in pool.stop(grace=0.5)] == [t.job_id]
    assert time.monotonic() - started < 5
    assert collector.results == {}
    # Handed back *and* killed: no child keeps running a job that runs again elsewhere.
    assert not [
        pid
        for pid in busy
        if pid is not None
        and psutil.pid_exists(pid)
        and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]


def test_many_noop_tasks(make_pool: PoolFactory) -> None:
    pool, collector = make_pool(2, preload=["tests.jobfuncs"])
    for t in (task("noop"), task("noop")):  # warm up
        pool.submit(t)
    assert pool.wait_idle(15)
    n = 2000
    tasks = [task("noop") for _ in range(n)]
    started = time.perf_counter()
    for t in tasks:
        pool.submit(t)
    assert pool.wait_idle(60)
    elapsed = time.perf_counter() - started
    assert len(collector.results) == n + 2
    assert all(r.status == "succeeded" for r in collector.results.values())
    print(f"\n{n} no-op tasks through 2 children: {n / elapsed:,.0f} tasks/s")
