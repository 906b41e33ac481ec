"""Two gateways on one PostgreSQL database: a client streams from the first while the model
server posts its tokens to the second. The second forwards them (LISTEN/NOTIFY), so the text
arrives as it is generated, not all at once from the stored result; a client that hangs up on
the first stops the generation on a server that talks only to the second."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostgpu.testing import Worker
from tests.conftest import Gateway
from tests.inference.test_gateway import HELLO, job_of, start_server

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]


@pytest.fixture
def two(pg_url: str, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    home = tmp_path / "home"
    home.mkdir()
    first = Gateway(home, pg_url).start()
    second = Gateway(home, pg_url).start()
    workers: list[Worker] = []
    start_server(second, workers, name="on-second")  # it knows only the second gateway
    yield first, second
    for w in workers:
        w.stop()
    second.stop()
    first.stop()


def stream(
    gateway: Gateway, token: str, body: dict[str, Any], *, hang_up_after: int | None = None
) -> list[tuple[float, str]]:
    """(arrival time, text) of each content chunk of an SSE chat stream."""
    seen: list[tuple[float, str]] = []
    with (
        gateway.http(token) as http,
        http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            text = choices[0]["delta"].get("content") if choices else None
            if text:
                seen.append((time.monotonic(), text))
                if hang_up_after is not None and len(seen) >= hang_up_after:
                    break
    return seen


def _max_tokens(job: dict[str, Any]) -> int:
    return int(job["payload"]["kwargs"]["request"]["sampling"]["max_tokens"])


BODY = {"model": "smollm2", "messages": HELLO, "temperature": 0, "ignore_eos": True}


def test_tokens_stream_through_the_other_gateway(two: tuple[Gateway, Gateway]) -> None:
    first, second = two
    with first.client() as admin:
        token = admin.create_token("reader", "infer").token
    body = {**BODY, "max_tokens": 60}
    reference = "".join(t for _, t in stream(second, token, body))  # warm; the server's own
    started = time.monotonic()
    chunks = stream(first, token, body)
    assert "".join(t for _, t in chunks) == reference
    # Token by token (about 10-30 a second here), not one piece from the stored result.
    assert len(chunks) >= 20, chunks
    first_at, last_at = chunks[0][0] - started, chunks[-1][0] - started
    assert first_at < last_at / 2, (first_at, last_at)


def test_hanging_up_on_one_gateway_stops_the_server_of_the_other(
    two: tuple[Gateway, Gateway],
) -> None:
    first, second = two
    with first.client() as admin:
        token = admin.create_token("reader", "infer").token
    stream(second, token, {**BODY, "max_tokens": 4})  # warm
    seen = stream(first, token, {**BODY, "max_tokens": 2000}, hang_up_after=3)
    assert len(seen) == 3
    hung_up = time.monotonic()
    deadline = hung_up + 15
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        [job] = [j for j in job_of(first) if _max_tokens(j) == 2000]
        if job["state"] == "cancelled":
            break
        time.sleep(0.1)
    assert job["state"] == "cancelled"
    # The server, which only the second gateway talks to, stopped generating.
    card: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with second.http(token) as http:
            [card] = http.get("/v1/models").json()["data"]
        if card["loaded_on"] and card["loaded_on"][0]["active"] == 0:
            break
        time.sleep(0.2)
    assert card["loaded_on"][0]["active"] == 0, card
    assert time.monotonic() - hung_up < 10


def test_requests_go_to_the_warm_server_of_another_gateway(
    two: tuple[Gateway, Gateway],
) -> None:
    """A cold server polls the first gateway, the warm one the second: requests sent to the
    first still go to the warm one, and the first lists where the model is loaded."""
    first, second = two
    with first.client() as admin:
        token = admin.create_token("reader", "infer").token
    stream(second, token, {**BODY, "max_tokens": 4})  # the second's server loads the model
    workers: list[Worker] = []
    start_server(first, workers, name="cold-on-first")
    try:
        deadline = time.monotonic() + 30
        card: dict[str, Any] = {}
        while time.monotonic() < deadline:  # the second told the first (at once, or <= 5 s)
            with first.http(token) as http:
                [card] = http.get("/v1/models").json()["data"]
            if [e["worker"] for e in card["loaded_on"]] == ["on-second"]:
                break
            time.sleep(0.2)
        assert [e["worker"] for e in card["loaded_on"]] == ["on-second"], card
        assert sorted(s["worker"] for s in card["servers"]) == ["cold-on-first", "on-second"]
        for _ in range(3):
            assert stream(first, token, {**BODY, "max_tokens": 4})
        with first.http() as http:
            names = {
                w["id"]: w["capabilities"]["name"]
                for w in http.get("/v1/workers").json()["workers"]
            }
        assert [names[str(j["worker_id"])] for j in job_of(first)] == ["on-second"] * 4
    finally:
        for w in workers:
            w.stop()
