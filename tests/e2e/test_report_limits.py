"""A worker never sends a report the gateway cannot take, and a refused report costs no job:
an oversized result fails its job at once with the reason (on the channel and over HTTP), a
report too large as a whole goes in parts, an outcome refused on its own fails its job
readably, and the reporter goes on after any of these. Text that is not Unicode (a lone
surrogate, as os.listdir gives for an undecodable file name) fails its job, or is refused
at submission with a 422, never stored. A job that forks does not break its worker."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

import hostgpu
from hostgpu.capabilities import Device
from hostgpu.client import Client
from hostgpu.errors import JobFailed
from hostgpu.jobs import MAX_ERROR_MESSAGE, MAX_TRACEBACK, JobError, Outcome
from hostgpu.worker.agent import WorkerAgent, WorkerConfig
from tests import e2efuncs as f
from tests.conftest import Gateway, Worker
from tests.e2e.raw import FUNCTION, register

BODY_LIMIT = 300_000


@pytest.mark.parametrize("transport", ["channel", "http"])
def test_oversized_result_fails_at_once_and_the_worker_goes_on(
    gateway: Gateway, workers: list[Worker], transport: str
) -> None:
    # 20 MB: over the result limit (8 MB) and over the body limit (16 MB) too. Before, the
    # report was refused whole (413), the reporter thread died, and this job and every later
    # one on the worker waited until the caller gave up.
    extra = ("--no-channel",) if transport == "http" else ()
    workers.append(Worker(gateway, extra_args=extra).start())
    hostgpu.connect(gateway.url, gateway.token)
    started = time.monotonic()
    with pytest.raises(JobFailed, match=r"ResultTooLarge: the result is 20000002 bytes"):
        f.big_result.remote(20_000_000)
    assert time.monotonic() - started < 15  # failed, not left to its lease's expiry
    assert f.add.remote(2, 3) == 5
    assert f.big_result.remote(1000) == "x" * 1000


def test_huge_error_message_is_cut_not_refused(gateway: Gateway, worker: Worker) -> None:
    hostgpu.connect(gateway.url, gateway.token)
    with pytest.raises(JobFailed, match="ValueError: yyyy"):
        f.boom_at_length.remote(20_000_000)
    with gateway.client() as api:
        [job] = api.list_jobs(function="tests.e2efuncs:boom_at_length").jobs
    assert job.error is not None
    message = job.error.message
    assert len(message) <= MAX_ERROR_MESSAGE
    assert message.startswith("yyyy") and "characters cut" in message
    assert f.add.remote(1, 1) == 2


def test_error_texts_are_bounded() -> None:
    error = JobError(type="E", message="m" * 10**6, traceback="head\n" + "t" * 10**6 + "\nlast")
    assert len(error.message) <= MAX_ERROR_MESSAGE
    assert len(error.traceback) <= MAX_TRACEBACK
    assert error.traceback.endswith("\nlast")  # what was raised, and where, is kept
    assert JobError(type="E", message="short").message == "short"


@pytest.fixture
def small_gateway(home: Path, gateway_factory: list[Gateway]) -> Gateway:
    gw = Gateway(
        home,
        f"sqlite:///{home / 'small.db'}",
        env_extra={"HOSTGPU_MAX_BODY_BYTES": str(BODY_LIMIT)},
    ).start()
    gateway_factory.append(gw)
    return gw


def test_report_too_large_as_a_whole_goes_in_parts(small_gateway: Gateway) -> None:
    gw = small_gateway
    with httpx.Client(
        base_url=gw.url, headers={"Authorization": f"Bearer {gw.token}"}, timeout=30
    ) as api:
        worker_id = register(api)
        ids = api.post(
            "/v1/jobs/batch", json={"jobs": [{"function": FUNCTION} for _ in range(7)]}
        ).json()["ids"]
        leases = api.post(f"/v1/workers/{worker_id}/lease", json={"max_jobs": 7}).json()["leases"]
        assert len(leases) == 7

        # The worker's reporter, on the real gateway: six 100 kB results (600 kB together,
        # twice the body limit) and one of 320 kB, over the body limit on its own.
        agent = WorkerAgent(
            WorkerConfig(gateway=gw.url, token=gw.token, devices=[Device(kind="cpu", name="c")])
        )
        agent.worker_id = worker_id
        agent._stop.set()  # report only: take no new jobs with the reports
        sizes = {lease["job_id"]: 100_000 for lease in leases[:6]}
        sizes[leases[6]["job_id"]] = 320_000
        batch = [
            Outcome(
                job_id=lease["job_id"],
                lease_token=lease["lease_token"],
                status="succeeded",
                result="r" * sizes[lease["job_id"]],
            )
            for lease in leases
        ]
        with Client(gw.url, gw.token) as client:
            agent._send_safely(client, batch)

        jobs = {j["id"]: j for j in api.post("/v1/jobs/wait", json={"ids": ids}).json()["jobs"]}
        assert len(jobs) == 7
        for job_id, size in sizes.items():
            job = jobs[job_id]
            if size == 100_000:
                assert job["state"] == "succeeded" and job["result"] == "r" * size
            else:  # failed readably, not left leased to run again (and be refused again)
                assert job["state"] == "failed", job
                assert job["error"]["type"] == "ReportRefused"
                assert "413" in job["error"]["message"]
        refused = api.get("/metrics").text
        assert 'status="413"' in refused  # the whole report was refused first, then split


def test_undecodable_text_fails_its_job_and_the_worker_goes_on(
    gateway: Gateway, workers: list[Worker]
) -> None:
    # Before, the report of either job could not be encoded: the worker's slots leaked, it
    # stopped heartbeating and leasing, and every job it held ran again on the next worker,
    # which broke the same way.
    workers.append(Worker(gateway, concurrency=1).start())
    hostgpu.connect(gateway.url, gateway.token)
    with pytest.raises(JobFailed, match="lone surrogate"):
        f.undecodable_names.remote()
    with pytest.raises(JobFailed, match=r"no such file: f\\udcff\.txt"):
        f.boom_undecodable.remote()
    # An exception whose str() raises is the job's failure too, not a crashed child.
    with pytest.raises(JobFailed, match=r"Unprintable: \(its str\(\) raised RuntimeError"):
        f.raise_unprintable.remote()
    assert f.add.map(range(20), progress=False) == list(range(20))


def test_lone_surrogate_in_a_request_is_refused_and_nothing_stored(gateway: Gateway) -> None:
    with gateway.http() as http:
        for body in (
            b'{"function": "tests.e2efuncs:add", "payload": {"args": ["\\ud800", 1]}}',
            b'{"function": "tests.e2efuncs:add\\udcff"}',
            b'{"jobs": [{"function": "tests.e2efuncs:add", "idempotency_key": "k\\udfff"}]}',
        ):
            path = "/v1/jobs/batch" if body.startswith(b'{"jobs"') else "/v1/jobs"
            reply = http.post(path, content=body, headers={"content-type": "application/json"})
            assert reply.status_code == 422, reply.text
            assert "lone UTF-16 surrogate" in reply.json()["detail"]
        # The same surrogate as raw UTF-8 bytes, and in a UTF-16 body: Python's JSON decoder
        # takes both.
        text = '{"function": "tests.e2efuncs:add", "payload": {"args": ["\ud800", 1]}}'
        for raw in (
            text.encode("utf-8", "surrogatepass"),
            text.encode("utf-16-le", "surrogatepass"),
        ):
            reply = http.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
            assert reply.status_code == 422 and "surrogate" in reply.text, reply.text
        assert http.get("/v1/jobs").json()["jobs"] == []  # nothing stored, listing works
        # A surrogate pair (how ensure_ascii encoders write emoji) is text: accepted.
        emoji = b'{"function": "tests.e2efuncs:add", "payload": {"args": ["\\ud83d\\ude00", 1]}}'
        reply = http.post("/v1/jobs", content=emoji, headers={"content-type": "application/json"})
        assert reply.status_code == 201, reply.text
        assert reply.json()["payload"]["args"] == ["\U0001f600", 1]


def test_a_result_nested_too_deep_fails_its_job_with_the_limit(
    gateway: Gateway, workers: list[Worker]
) -> None:
    workers.append(Worker(gateway).start())
    hostgpu.connect(gateway.url, gateway.token)
    assert len(str(f.nested.remote(100))) == 200
    with pytest.raises(JobFailed, match=r"TooDeep: .* nested 101 levels deep; the gateway takes"):
        f.nested.remote(101)
    # Past the JSON encoder's own recursion limit: still the job's failure, with the reason.
    with pytest.raises(JobFailed, match=r"not JSON-serializable .*recursion"):
        f.nested.remote(5000)


def test_json_nested_too_deep_is_refused_with_the_limit(gateway: Gateway) -> None:
    # Before, 500 levels were stored and failed on the worker with pickle's RecursionError.
    def submit(http: httpx.Client, depth: int, then: str = "1") -> httpx.Response:
        nested = "[" * depth + "]" * depth
        body = f'{{"function": "tests.e2efuncs:add", "payload": {{"args": [{nested}, {then}]}}}}'
        return http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})

    with gateway.http() as http:
        for depth in (98, 500, 50_000):  # the body's own two levels, and the args list: 101
            reply = submit(http, depth)
            assert reply.status_code == 422, reply.text
            assert "the limit is 100" in reply.json()["detail"]
        assert http.get("/v1/jobs").json()["jobs"] == []
        # 100 levels pass, and brackets inside strings are text, not nesting.
        reply = submit(http, 97)
        assert reply.status_code == 201, reply.text
        assert submit(http, 1, '"' + "[{" * 500 + '"').status_code == 201


def test_a_job_that_forks_leaves_its_worker_working(
    gateway: Gateway, workers: list[Worker]
) -> None:
    workers.append(Worker(gateway, concurrency=1).start())
    hostgpu.connect(gateway.url, gateway.token)
    assert f.fork_and_return.remote() == "forked"
    assert f.add.remote(2, 2) == 4
    # The child still answers alone, and its supervisor still enforces timeouts on it.
    with pytest.raises(JobFailed, match="Timeout"):
        f.hang.remote(30)
    assert f.add.remote(3, 3) == 6


def test_waiting_on_a_job_that_does_not_exist_is_a_404_not_a_silent_wait(
    gateway: Gateway,
) -> None:
    with gateway.http() as http:
        [job_id] = http.post(
            "/v1/jobs/batch", json={"jobs": [{"function": "tests.e2efuncs:add"}]}
        ).json()["ids"]
        for path in ("/v1/jobs/wait", "/v1/jobs/results"):
            started = time.monotonic()
            reply = http.post(path, json={"ids": [job_id, "0" * 32, "1" * 32], "timeout": 30})
            assert reply.status_code == 404, reply.text
            assert f"no job with id '{'0' * 32}' (and 1 more)" in reply.json()["detail"]
            assert time.monotonic() - started < 5
            # A job that exists but has not finished is waited for, as before.
            reply = http.post(path, json={"ids": [job_id], "timeout": 0.5})
            assert reply.status_code == 200 and next(iter(reply.json().values())) == []
            prefix = http.post(path, json={"ids": [job_id[:8]], "timeout": 0.5})
            assert prefix.status_code == 422 and "ids" in prefix.text


def test_a_job_does_not_change_the_next_ones_directory_or_environment(
    gateway: Gateway, workers: list[Worker]
) -> None:
    workers.append(Worker(gateway, concurrency=1).start())  # one child: the same process
    hostgpu.connect(gateway.url, gateway.token)
    before = f.process_state.remote()
    assert f.change_process_state.remote() == "/"
    assert f.process_state.remote() == before and before["leak"] is None
    assert before["home"] and before["path"] != "/nowhere"  # changed and removed: restored
