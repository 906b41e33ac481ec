"""Two gateways on one PostgreSQL database see a worker the same way: what it registered last,
through either of them.

Each gateway caches a worker's capabilities for its lease polls. A worker registers twice as
it starts (at once, then with the functions its first child published), and a load balancer
(``deploy/two-gateways``: nginx, ``least_conn``) may send the two to different gateways."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway
from tests.e2e.raw import FUNCTION

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

CAPS: dict[str, Any] = {
    "name": "raw",
    "devices": [{"kind": "cpu", "name": "cpu"}],
    "modules": ["foreign"],
    "functions": {},
}


@pytest.fixture
def two(pg_url: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    home = tmp_path / "home"
    home.mkdir()
    first = Gateway(home, pg_url).start()
    second = Gateway(home, pg_url).start()
    with first.http() as a, second.http() as b:
        yield a, b
    second.stop()
    first.stop()


def poll(api: httpx.Client, worker_id: str, wait: float) -> list[str]:
    reply = api.post(f"/v1/workers/{worker_id}/lease", json={"max_jobs": 1, "wait": wait})
    assert reply.status_code == 200, reply.text
    return [lease["job_id"] for lease in reply.json()["leases"]]


def test_a_worker_registered_again_through_the_other_gateway_gets_its_new_functions_jobs(
    two: tuple[httpx.Client, httpx.Client],
) -> None:
    a, b = two
    worker_id = a.post("/v1/workers", json=CAPS).json()["worker_id"]
    assert poll(a, worker_id, 0) == []  # the first gateway has read its capabilities

    # The worker registers again through the second gateway, now publishing a function.
    again = b.post(
        "/v1/workers",
        params={"worker_id": worker_id},
        json={**CAPS, "functions": {FUNCTION: {"gpu": "cpu", "timeout": 30, "retries": 0}}},
    )
    assert again.status_code == 201 and again.json()["worker_id"] == worker_id, again.text
    job_id = b.post("/v1/jobs", json={"function": FUNCTION}).json()["id"]

    # The worker polls the first gateway, as a worker does, until it gets a job.
    deadline = time.monotonic() + 20
    leased: list[str] = []
    while not leased and time.monotonic() < deadline:
        leased = poll(a, worker_id, 5)
    assert leased == [job_id]


def test_a_long_poll_in_flight_ends_when_its_worker_registers_again_elsewhere(
    two: tuple[httpx.Client, httpx.Client],
) -> None:
    """It would otherwise wait out its whole ``wait`` with the old capabilities."""
    a, b = two
    worker_id = a.post("/v1/workers", json=CAPS).json()["worker_id"]
    with httpx.Client(base_url=str(a.base_url), headers=a.headers, timeout=60) as slow:
        started = time.monotonic()
        result: list[list[str]] = []
        poller = threading.Thread(target=lambda: result.append(poll(slow, worker_id, 30)))
        poller.start()
        time.sleep(1)  # the poll is waiting
        b.post("/v1/workers", params={"worker_id": worker_id}, json={**CAPS, "name": "renamed"})
        poller.join(40)
        assert result == [[]]
        assert time.monotonic() - started < 15
