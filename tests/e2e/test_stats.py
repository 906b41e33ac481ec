"""The dashboard's read-only API against a real gateway and worker: queue figures with their
reasons and fixes, throughput, worker load, the event stream, requeue and who-am-I."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from hostgpu.errors import InvalidTransition
from hostgpu.jobs import JobSpec, JobState, Payload
from tests.conftest import Gateway, Worker


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Worker]]:
    """One gateway and worker for the module (each test leaves the queue as it found it)."""
    home = tmp_path_factory.mktemp("stats-home")
    gateway = Gateway(
        home, f"sqlite:///{home / 'hostgpu.db'}", env_extra={"HOSTGPU_LEASE_SECONDS": "3"}
    ).start()
    worker = Worker(gateway).start()
    try:
        yield gateway, worker
    finally:
        worker.stop()
        gateway.stop()


@pytest.fixture
def gateway(stack: tuple[Gateway, Worker]) -> Gateway:
    return stack[0]


@pytest.fixture
def worker(stack: tuple[Gateway, Worker]) -> Worker:
    return stack[1]


def spec(function: str, *args: object) -> JobSpec:
    return JobSpec(function=f"tests.e2efuncs:{function}", payload=Payload(args=list(args)))


def test_queue_figures_say_why_and_what_to_do(gateway: Gateway, worker: Worker) -> None:
    with gateway.client() as api:
        waiting = api.submit(spec("needs_mps"))
        stats = api.queue_stats()
        [queue] = [q for q in stats.queues if q.gpu == "mps"]
        assert queue.queued == 1 and queue.oldest_wait_s is not None
        [fn] = queue.functions
        assert fn.function == "tests.e2efuncs:needs_mps"
        assert fn.waiting and fn.waiting.startswith("waiting: no worker with mps")
        assert fn.fix and "natively on a Mac" in fn.fix
        assert stats.queued >= 1
        api.cancel(waiting.id)
        deadline = time.monotonic() + 10  # the figures may be a second old
        while any(q.gpu == "mps" for q in api.queue_stats().queues):
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_throughput_and_worker_activity_follow_finished_jobs(
    gateway: Gateway, worker: Worker
) -> None:
    with gateway.client() as api:
        before = api.throughput(window=600, bucket=60)
        ids = api.submit_batch([spec("add", i, 1) for i in range(3)] + [spec("boom", "no")])
        deadline = time.monotonic() + 60
        while len(api.wait(ids, timeout=5)) < len(ids) and time.monotonic() < deadline:
            pass
        deadline = time.monotonic() + 10  # the figures may be a second old
        while (after := api.throughput(window=600, bucket=60)).succeeded < before.succeeded + 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert after.succeeded == before.succeeded + 3
        assert after.failed == before.failed + 1
        assert after.since % 60 == 0 and all(b.start >= after.since for b in after.buckets)
        assert any(b.wait_avg_s is not None for b in after.buckets)
        time.sleep(1.1)
        [mine] = [w for w in api.worker_activity(window=60).workers if w.succeeded]
        assert mine.succeeded >= 3 and mine.failed >= 1 and mine.per_minute >= 4.0


def test_the_event_stream_says_when_jobs_change(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gateway.token}"}
    with httpx.stream("GET", f"{gateway.url}/v1/events", headers=headers, timeout=30) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "event: hello"
        with gateway.client() as api:
            api.submit(spec("add", 1))
        events = []
        event = ""
        for line in lines:
            if line.startswith("event:"):
                event = line.partition(":")[2].strip()
            elif line.startswith("data:") and event == "change":
                events.append(json.loads(line[5:])["topics"])
                break
        assert "enqueued" in events[0], events


def test_requeue_takes_a_running_job_back(gateway: Gateway, worker: Worker) -> None:
    with gateway.client() as api:
        job = api.submit(spec("sleepy", 60))
        deadline = time.monotonic() + 30
        while api.get(job.id).state is not JobState.running:
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        again = api.requeue(job.id)
        assert again.state is JobState.queued and again.failures == 0
        with pytest.raises(InvalidTransition, match="only a leased or running job"):
            api.cancel(job.id) and api.requeue(job.id)
        history = api.get(job.id).history or []
        assert history[0].outcome == "requeued"


def test_who_am_i_for_every_scope(gateway: Gateway) -> None:
    with gateway.client() as admin:
        reader = admin.create_token("viewer", "read")
        assert admin.whoami().scope == "admin"
    with gateway.client(reader.token) as api:
        me = api.whoami()
        assert (me.id, me.name, me.scope) == (reader.id, "viewer", "read")


def test_bad_requests_get_a_4xx_with_a_reason(gateway: Gateway) -> None:
    cases = [
        ("POST", "/v1/jobs/0123456789abcdef/requeue", 404, "no job"),
        ("GET", "/v1/stats/throughput?window=10", 422, "window"),
        ("GET", "/v1/stats/throughput?bucket=0", 422, "bucket"),
        ("GET", "/v1/stats/workers?window=abc", 422, "window"),
        ("GET", "/dashboard/../admin-token", 404, ""),
    ]
    with gateway.http() as http:
        wide = http.get("/v1/stats/throughput", params={"window": 604800, "bucket": 1}).json()
        assert wide["bucket_s"] == 420, "at most 1,440 buckets: the bucket is widened"
        for method, path, status, needle in cases:
            reply = http.request(method, path)
            assert reply.status_code == status, (path, reply.text)
            if needle:
                assert needle in reply.json()["detail"].lower(), (path, reply.text)
