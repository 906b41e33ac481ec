"""/metrics as Prometheus reads it: parsed with prometheus_client's own text parser, scraped
with a read token, and checked to move as jobs run, fail, wait, fall back and get lost."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostgpu.jobs import JobSpec, JobState, Payload
from tests.conftest import Gateway, Worker

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
ADD = "tests.e2efuncs:add"


def scrape(gateway: Gateway, token: str) -> Samples:
    reply = httpx.get(
        f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert reply.status_code == 200, reply.text
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, frozenset(labels.items())), 0.0)


def eventually(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the metric never got there"
        time.sleep(0.2)


def spec(function: str, *args: object) -> JobSpec:
    return JobSpec(function=f"tests.e2efuncs:{function}", payload=Payload(args=list(args)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Worker, str]]:
    home = tmp_path_factory.mktemp("metrics-home")
    gateway = Gateway(
        home,
        f"sqlite:///{home / 'hostgpu.db'}",
        env_extra={"HOSTGPU_LEASE_SECONDS": "3", "HOSTGPU_FALLBACK_GRACE_SECONDS": "1"},
    ).start()
    worker = Worker(gateway, name="metrics-worker").start()
    with gateway.client() as api:
        reader = api.create_token("prometheus", "read").token
    try:
        yield gateway, worker, reader
    finally:
        worker.stop()
        gateway.stop()


def test_scrape_needs_a_read_token(stack: tuple[Gateway, Worker, str]) -> None:
    gateway, _, reader = stack
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401
    with gateway.client() as api:
        worker_token = api.create_token("w", "worker").token
    bad = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {worker_token}"})
    assert bad.status_code == 403
    samples = scrape(gateway, reader)
    assert value(samples, "hostgpu_workers_alive") == 1
    assert (
        value(samples, "hostgpu_workers_alive_by_device", kind="cpu", name=cpu_name(gateway)) == 1
    )


def cpu_name(gateway: Gateway) -> str:
    with gateway.client() as api:
        [w] = api.workers(alive=True)
    return next(d.name for d in w.capabilities.devices if d.kind == "cpu")


def test_counters_and_histograms_move_as_jobs_finish(stack: tuple[Gateway, Worker, str]) -> None:
    gateway, _, reader = stack
    before = scrape(gateway, reader)
    with gateway.client() as api:
        ids = api.submit_batch([spec("add", i, 1) for i in range(3)] + [spec("boom", "no")])
        # An idempotency key that names an existing job is not a second submission.
        keyed = JobSpec(function=ADD, payload=Payload(args=[1]), idempotency_key="once")
        api.submit(keyed)
        api.submit(keyed)
        for job_id in ids:
            api.get(job_id, wait=30)
    labels = {"function": ADD, "requirement": "cpu"}
    boom = {"function": "tests.e2efuncs:boom", "requirement": "cpu"}

    def moved() -> bool:
        now = scrape(gateway, reader)
        return (
            value(now, "hostgpu_jobs_succeeded_total", **labels)
            - value(before, "hostgpu_jobs_succeeded_total", **labels)
            == 4
        )

    eventually(moved)
    after = scrape(gateway, reader)

    def delta(name: str, **lab: str) -> float:
        return value(after, name, **lab) - value(before, name, **lab)

    assert delta("hostgpu_jobs_submitted_total", **labels) == 4
    assert delta("hostgpu_jobs_submitted_total", **boom) == 1
    assert delta("hostgpu_jobs_failed_total", **boom) == 1
    assert delta("hostgpu_jobs_succeeded_total", **boom) == 0
    by_device = {"function": ADD, "device": "cpu"}
    assert delta("hostgpu_job_run_seconds_count", **by_device) == 4
    assert delta("hostgpu_job_queue_wait_seconds_count", **by_device) == 4
    assert delta("hostgpu_job_queue_wait_seconds_sum", **by_device) >= 0
    # Every observation is under the +Inf bucket, and the buckets are cumulative.
    assert value(after, "hostgpu_job_run_seconds_bucket", **by_device, le="+Inf") == value(
        after, "hostgpu_job_run_seconds_count", **by_device
    )


def test_queue_gauges_cancel_and_fallback(stack: tuple[Gateway, Worker, str]) -> None:
    gateway, _, reader = stack
    with gateway.client() as api:
        waiting = api.submit(spec("needs_mps"))
        time.sleep(1.2)
        samples = scrape(gateway, reader)
        assert value(samples, "hostgpu_queue_depth", requirement="mps") == 1
        assert value(samples, "hostgpu_queue_oldest_seconds", requirement="mps") >= 1
        assert value(samples, "hostgpu_jobs", state="queued") >= 1
        api.cancel(waiting.id)
        fallback = api.submit(spec("mps_or_cpu"))  # runs on the CPU after the 1 s grace
        assert api.get(fallback.id, wait=30).fallback_used
    mps = {"requirement": "mps"}

    def settled() -> bool:
        now = scrape(gateway, reader)
        return (
            value(now, "hostgpu_jobs_fallback_total", function="tests.e2efuncs:mps_or_cpu", **mps)
            == 1
        )

    eventually(settled)
    samples = scrape(gateway, reader)
    assert (
        value(samples, "hostgpu_jobs_cancelled_total", function="tests.e2efuncs:needs_mps", **mps)
        == 1
    )
    assert value(samples, "hostgpu_queue_depth", **mps) == 0


def test_a_dead_workers_lease_is_counted_once(stack: tuple[Gateway, Worker, str]) -> None:
    gateway, _, reader = stack
    doomed = Worker(gateway, name="doomed", extra_args=("--label", "box=doomed")).start()
    sleepy = {"function": "tests.e2efuncs:sleepy", "requirement": "cpu"}
    try:
        with gateway.client() as api:
            # Only the labelled worker may take this job.
            job = api.submit(
                JobSpec(
                    function="tests.e2efuncs:sleepy",
                    payload=Payload(args=[30]),
                    labels={"box": "doomed"},
                )
            )
            eventually(lambda: api.get(job.id).state is JobState.running)
            doomed.kill()  # SIGKILL: its lease runs out 3 s later
            eventually(
                lambda: (
                    value(scrape(gateway, reader), "hostgpu_leases_expired_total", worker="doomed")
                    == 1
                )
            )
            assert value(scrape(gateway, reader), "hostgpu_jobs_lost_total", **sleepy) == 1
            api.cancel(job.id)
    finally:
        doomed.stop()


def worker_id(gateway: Gateway, name: str) -> str | None:
    with gateway.client() as api:
        return next((w.id for w in api.workers() if w.capabilities.name == name), None)


@pytest.mark.postgres
def test_two_gateways_count_each_job_once(pg_url: str, tmp_path: Path) -> None:
    """Several gateways on one PostgreSQL: counters summed over gateways are the truth, and the
    store-read gauges agree (aggregate them with max, not sum)."""
    home = tmp_path / "home"
    home.mkdir()
    first = Gateway(home, pg_url).start()
    second = Gateway(home, pg_url).start()
    worker = Worker(first, name="pg-worker").start()
    try:
        with first.client() as api:
            reader = api.create_token("prometheus", "read").token
        ids = []
        for gateway in (first, second, second):
            with gateway.client() as api:
                ids.append(api.submit(spec("add", 1, 2)).id)
                ids.append(api.submit(spec("needs_mps")).id)
        with second.client() as api:
            for job_id in ids[::2]:
                assert api.get(job_id, wait=30).state is JobState.succeeded
        labels = {"function": ADD, "requirement": "cpu"}

        def total(name: str, **lab: str) -> float:
            return sum(value(scrape(g, reader), name, **lab) for g in (first, second))

        eventually(lambda: total("hostgpu_jobs_succeeded_total", **labels) == 3)
        assert total("hostgpu_jobs_submitted_total", **labels) == 3
        assert value(scrape(first, reader), "hostgpu_jobs_submitted_total", **labels) == 1
        assert value(scrape(second, reader), "hostgpu_jobs_submitted_total", **labels) == 2
        depths = [
            value(scrape(g, reader), "hostgpu_queue_depth", requirement="mps")
            for g in (first, second)
        ]
        assert depths == [3, 3]
    finally:
        worker.stop()
        second.stop()
        first.stop()
