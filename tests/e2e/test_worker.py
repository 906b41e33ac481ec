"""Real gateway + real worker processes: the SDK, routing and the fault guarantees."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import hostgpu
from hostgpu.client import Client
from hostgpu.errors import JobCancelled, JobFailed, JobTimeout, NotFound
from hostgpu.jobs import JobSpec, Payload
from tests import e2efuncs as f
from tests.conftest import Gateway, Worker


@pytest.fixture(autouse=True)
def sdk(gateway: Gateway) -> Iterator[None]:
    hostgpu.connect(gateway.url, gateway.token)
    yield


def wait_state(gateway: Gateway, job_id: str, states: set[str], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    with gateway.http() as http:
        while time.monotonic() < deadline:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {job}")


def test_remote_spawn_map_and_local_call(worker: Worker) -> None:
    assert f.add(2, 3) == 5  # a plain call runs here
    assert f.add.remote(2, b=3) == 5
    handle = f.add.spawn(40, 2)
    assert handle.result(timeout=30) == 42
    assert handle.status() == "succeeded"
    assert f.add.map(range(50), range(50), progress=False) == [2 * i for i in range(50)]


def test_device_inside_job_and_recorded(worker: Worker, gateway: Gateway) -> None:
    handle = f.where.spawn()
    result = handle.result(timeout=30)
    assert result["device"] == "cpu" and result["job"] == handle.id
    job = handle.job()
    assert job.device == "cpu" and not job.fallback_used
    assert job.timings and "run_s" in job.timings


def test_children_stay_warm_between_jobs(worker: Worker) -> None:
    pids = {f.where.remote()["pid"] for _ in range(5)}
    assert len(pids) == 1


def test_exception_is_reraised_with_remote_traceback(worker: Worker) -> None:
    with pytest.raises(JobFailed) as info:
        f.boom.remote("kaput")
    assert info.value.error_type == "ValueError"
    assert "kaput" in str(info.value)
    assert "def boom" in (info.value.remote_traceback or "") or "boom" in str(
        info.value.remote_traceback
    )


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: f.hang.remote(30), "timeout"),
        (lambda: f.exit_hard.remote(3), "exit"),
        (lambda: f.segfault.remote(), "SIGSEGV"),
    ],
    ids=["timeout", "os._exit", "segfault"],
)
def test_worker_survives_crashes_and_hangs(worker: Worker, call, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(JobFailed) as info:
        call()
    assert needle.lower() in str(info.value).lower()
    assert f.add.remote(1, 1) == 2  # the worker is still there, with a fresh child
    assert worker.proc is not None and worker.proc.poll() is None


def test_retries_until_success(worker: Worker, tmp_path: Path, gateway: Gateway) -> None:
    handle = f.flaky.spawn(str(tmp_path / "count"), 2)
    assert handle.result(timeout=60) == 3
    job = gateway.client().get(handle.id)
    assert job.attempts == 3


def test_mps_job_waits_on_a_cpu_fleet_and_never_runs_on_cpu(
    worker: Worker, gateway: Gateway
) -> None:
    handle = f.needs_mps.spawn()
    with pytest.raises(JobTimeout) as info:
        handle.result(timeout=3)
    assert "waiting: no worker with mps" in str(info.value)
    job = gateway.client().get(handle.id)
    assert job.state.value == "queued" and job.attempts == 0
    assert job.waiting and "no worker with mps" in job.waiting
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=5)


def test_explicit_fallback_is_recorded(worker: Worker, gateway: Gateway) -> None:
    handle = f.mps_or_cpu.spawn()
    assert handle.result(timeout=30) == "cpu"
    job = gateway.client().get(handle.id)
    assert job.fallback_used and job.device == "cpu"


def test_cancel_running_job_kills_it(worker: Worker, gateway: Gateway) -> None:
    handle = f.sleepy.spawn(30)
    wait_state(gateway, handle.id, {"running"})
    started = time.monotonic()
    handle.cancel()
    with pytest.raises(JobCancelled):
        handle.result(timeout=10)
    assert f.add.remote(2, 2) == 4
    assert time.monotonic() - started < 20


def test_unimportable_module_waits_with_reason(worker: Worker, gateway: Gateway) -> None:
    with gateway.client() as api:
        from hostgpu.jobs import JobSpec

        job = api.submit(JobSpec(function="not.imported:fn"))
        time.sleep(1.5)
        job = api.get(job.id)
    assert job.state.value == "queued"
    assert job.waiting and "imports not.imported" in job.waiting


def test_oversized_result_fails_readably(home: Path, gateway_factory) -> None:  # type: ignore[no-untyped-def]
    gw = Gateway(
        home, f"sqlite:///{home / 'r.db'}", env_extra={"HOSTGPU_MAX_RESULT_BYTES": "1000"}
    ).start()
    gateway_factory.append(gw)
    w = Worker(gw).start()
    try:
        hostgpu.connect(gw.url, gw.token)
        assert f.big_result.remote(10) == "x" * 10
        with pytest.raises(JobFailed, match="HOSTGPU_MAX_RESULT_BYTES"):
            f.big_result.remote(5000)
    finally:
        w.stop()


def test_job_output_is_bounded_in_the_worker_log(gateway: Gateway, workers: list[Worker]) -> None:
    w = Worker(
        gateway, imports=("tests.jobfuncs",), env_extra={"HOSTGPU_JOB_OUTPUT_BYTES": "1000"}
    ).start()
    workers.append(w)
    from hostgpu.jobs import JobSpec, Payload

    spec = JobSpec(
        function="tests.jobfuncs:shout", payload=Payload(args=[8 << 20], kwargs={"line": "hi"})
    )
    with gateway.client() as api:
        job = api.submit(spec, wait=30)
    assert job.state.value == "succeeded" and job.result == "done"
    said = (
        f"job {job.id} wrote {3 + (16 << 20):,} bytes to stdout and stderr: the first 1,000 "
        f"are in this log, {3 + (16 << 20) - 1000:,} bytes were left out"
    ).encode()
    path = gateway.home / f"worker-{w.name}.log"
    deadline = time.monotonic() + 10  # the worker writes what it keeps from its own thread
    while not (b"hi\nxxx" in path.read_bytes() and said in path.read_bytes()):
        assert time.monotonic() < deadline, path.read_bytes()[-2000:]
        time.sleep(0.1)
    assert len(path.read_bytes()) < 100_000  # 16 MiB written, about 1000 bytes kept


def test_pickle_only_for_opted_in_functions(worker: Worker) -> None:
    assert f.pickled.remote({1, 2}) == {1, 2}
    with pytest.raises(TypeError, match="JSON"):
        f.add.remote({1}, 2)  # a set is not JSON: refused before it leaves the caller


def test_killed_worker_job_is_rerun_once_and_late_completion_refused(
    gateway: Gateway, workers: list[Worker], tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    doomed = Worker(gateway).start()
    workers.append(doomed)
    handle = f.slow_record.spawn(str(marker), 1.0)
    wait_state(gateway, handle.id, {"running", "leased"})
    while not marker.exists():
        time.sleep(0.05)
    first = gateway.client().get(handle.id)
    doomed.kill()  # SIGKILL: no goodbye, no release
    rescuer = Worker(gateway).start()
    workers.append(rescuer)
    assert handle.result(timeout=60) == "done"
    job = gateway.client().get(handle.id)
    history = job.history or []
    assert job.state.value == "succeeded" and job.attempts == 2
    assert [a.outcome for a in history] == ["lost", "succeeded"]
    # The dead worker's lease token can no longer complete the job.
    from hostgpu.jobs import Outcome

    with gateway.http() as http:
        token = http.get(f"/v1/jobs/{handle.id}").json()
        assert token["state"] == "succeeded"
    assert first.worker_id != job.worker_id
    with gateway.client() as api:
        refused = api.report(
            first.worker_id or "x",
            [Outcome(job_id=handle.id, lease_token="0" * 32, status="succeeded", result="stale")],
        )
    assert refused.results[0].accepted is False
    assert gateway.client().get(handle.id).result == "done"


def test_gateway_restart_loses_nothing_and_worker_reregisters(
    gateway: Gateway, workers: list[Worker], tmp_path: Path
) -> None:
    w = Worker(gateway).start()
    workers.append(w)
    running = f.slow_record.spawn(str(tmp_path / "runs"), 2.0)
    queued = [f.add.spawn(i, 1) for i in range(20)]
    wait_state(gateway, running.id, {"running", "leased"})
    gateway.kill()
    time.sleep(0.5)
    gateway.start()
    assert running.result(timeout=60) == "done"
    assert [h.result(timeout=60) for h in queued] == [i + 1 for i in range(20)]
    assert f.add.remote(5, 5) == 10  # the same worker serves the restarted gateway
    assert w.proc is not None and w.proc.poll() is None


def test_warm_stop_finishes_the_running_job(gateway: Gateway, workers: list[Worker]) -> None:
    w = Worker(gateway).start()
    handle = f.sleepy.spawn(1.5)
    wait_state(gateway, handle.id, {"running"})
    w.signal(signal.SIGTERM)
    assert w.proc is not None and w.proc.wait(30) == 0
    assert handle.result(timeout=5) == 1.5


def test_a_worker_cut_off_from_its_gateway_stops_on_the_first_sigterm(
    gateway: Gateway, workers: list[Worker]
) -> None:
    w = Worker(gateway).start()
    gateway.kill()  # the worker now retries a gateway that is gone
    time.sleep(1.0)
    started = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.proc is not None and w.proc.wait(30) == 0
    assert time.monotonic() - started < 15  # not after its retries give up
    gateway.start()  # for the fixture's teardown


def test_cold_stop_hands_the_job_back(gateway: Gateway, workers: list[Worker]) -> None:
    w = Worker(gateway).start()
    handle = f.sleepy.spawn(20)
    wait_state(gateway, handle.id, {"running"})
    w.signal(signal.SIGTERM)
    time.sleep(0.3)
    w.signal(signal.SIGTERM)
    assert w.proc is not None and w.proc.wait(30) == 0
    job = wait_state(gateway, handle.id, {"queued"})
    assert job["attempts"] == 0  # handed back, not counted as a failure
    handle.cancel()


@pytest.mark.parametrize("transport", ["channel", "http"])
def test_a_job_leased_ahead_behind_a_long_one_goes_to_a_free_worker(
    gateway: Gateway, workers: list[Worker], transport: str
) -> None:
    # Found by an outside test: a worker that had been running short jobs leased the next
    # ones ahead, so a short job waited there behind a 40 s one while another worker idled.
    extra = ("--no-channel",) if transport == "http" else ()
    busy = Worker(gateway, concurrency=1, extra_args=extra).start()
    workers.append(busy)
    assert f.add.map(range(200), progress=False) == list(range(200))  # now it leases ahead
    long = f.sleepy.spawn(60)
    wait_state(gateway, long.id, {"running"})
    short = f.add.spawn(1, 1)
    assert wait_state(gateway, short.id, {"leased"})["worker_id"] == worker_id(gateway, busy)
    free = Worker(gateway, concurrency=1, extra_args=extra).start()
    workers.append(free)
    # Handed back after a second waiting for the busy child, and run by the free worker.
    assert short.result(timeout=20) == 2
    assert wait_state(gateway, short.id, {"succeeded"})["worker_id"] == worker_id(gateway, free)
    assert wait_state(gateway, long.id, {"running"})["worker_id"] == worker_id(gateway, busy)
    long.cancel()


def test_a_stopping_gateway_answers_its_long_polls_and_callers_ride_out_the_restart(
    gateway: Gateway, workers: list[Worker]
) -> None:
    # Found by an outside test: SIGTERM during a long poll held the shutdown for its 5 s
    # grace, then cancelled the poll: its caller got a 500, and a .map() failed with it.
    workers.append(Worker(gateway).start())
    running = f.sleepy.spawn(3)
    wait_state(gateway, running.id, {"running"})
    with gateway.http() as http, ThreadPoolExecutor(2) as pool:
        path = f"/v1/jobs/{running.id}"
        poll = pool.submit(http.get, path, params={"wait": 30}, timeout=60)
        mapped = pool.submit(f.sleepy.map, [0.3] * 12, progress=False)
        time.sleep(1.0)
        assert gateway.proc is not None
        started = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        gateway.proc.wait(15)
        stopped = time.monotonic() - started
        reply = poll.result(10)
        assert reply.status_code == 200 and reply.json()["state"] == "running", reply.text
        assert stopped < 3, f"the gateway took {stopped:.1f} s to stop"
        gateway.start()  # the .map() waiting meanwhile carries on with the same gateway
        assert mapped.result(90) == [0.3] * 12
    assert running.result(timeout=60) == 3


class _OlderGateway(httpx.HTTPTransport):
    """The real gateway, as one from before ``POST /v1/jobs/results`` would answer it."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/results":
            return httpx.Response(404, json={"detail": "Not Found"})
        return super().handle_request(request)


def test_an_sdk_newer_than_its_gateway_reads_results_through_wait(
    worker: Worker, gateway: Gateway
) -> None:
    handles = [f.add.spawn(i, 1) for i in range(5)]
    with Client(gateway.url, gateway.token, transport=_OlderGateway()) as client:
        ids = [h.id for h in handles]
        done: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while len(done) < len(ids) and time.monotonic() < deadline:
            done.update({r.id: r.result for r in client.results(ids, timeout=5)})
        assert [done[i] for i in ids] == [1, 2, 3, 4, 5]
        with pytest.raises(NotFound, match="no job with id"):  # still a 404 for a wrong id
            client.results(["0" * 32], timeout=1)


def worker_id(gateway: Gateway, worker: Worker) -> str:
    with gateway.http() as http:
        listed = http.get("/v1/workers").json()["workers"]
    return next(w["id"] for w in listed if w["capabilities"]["name"] == worker.name)


def test_fetched_inputs_are_kept_within_the_cache_bound(
    gateway: Gateway, workers: list[Worker], tmp_path: Path
) -> None:
    """HOSTGPU_INPUTS_CACHE_BYTES bounds the worker's fetched inputs: after each fetch the
    least recently used go, never the file of the job that is about to run."""
    worker = Worker(gateway, env_extra={"HOSTGPU_INPUTS_CACHE_BYTES": "1500"}).start()
    workers.append(worker)
    digests = []
    with gateway.client() as api:
        for n in range(3):
            path = tmp_path / f"input-{n}.bin"
            path.write_bytes(bytes([n]) * 1000)
            digests.append(api.put_blob(path))
        for digest in [*digests, digests[-1]]:  # the last one again: from the cache
            spec = JobSpec(
                function="tests.e2efuncs:input_size",
                payload=Payload(args=[digest]),
                inputs=[digest],
            )
            [done] = api.wait([api.submit(spec).id], timeout=60)
            assert done.state.value == "succeeded" and done.result == 1000, done.error
    cached = {p.name for p in (gateway.home / "inputs").rglob("*") if p.is_file()}
    assert cached == {digests[-1]}
