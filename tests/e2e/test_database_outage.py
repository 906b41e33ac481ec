"""A PostgreSQL outage under a live gateway and worker: every request answers 503 with
Retry-After (never a 500), the worker rides it out, and work resumes when the database is back.

The outage is a real TCP proxy between the gateway and PostgreSQL, closed (connections cut,
new ones refused) and opened again: what a database restart or a network cut does.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hostgpu.errors import GatewayUnavailable
from hostgpu.jobs import JobSpec, JobState, Payload
from tests.conftest import Gateway, Worker


class Proxy:
    """A loopback TCP proxy to PostgreSQL that can be cut and restored on the same port."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target_port = target_port
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    def open(self) -> None:
        self._call(self._open())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # a reset, as when the server's process dies
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def _via(url: str, port: int) -> str:
    head, _, tail = url.rpartition("/")
    return f"{head.rsplit(':', 1)[0]}:{port}/{tail}"


@pytest.fixture
def proxied(pg_url: str, tmp_path: Path) -> Iterator[tuple[Proxy, Gateway, Worker]]:
    proxy = Proxy()
    proxy.open()
    gateway = Gateway(tmp_path, _via(pg_url, proxy.port)).start()
    worker = Worker(gateway, name="outage-worker").start()
    try:
        yield proxy, gateway, worker
    finally:
        proxy.open() if proxy._server is None else None
        worker.stop()
        gateway.stop()
        proxy.close()


def _add(a: int, b: int) -> JobSpec:
    return JobSpec(function="tests.e2efuncs:add", payload=Payload(args=[a, b]))


def test_a_database_outage_is_a_503_and_work_resumes_after_it(
    proxied: tuple[Proxy, Gateway, Worker],
) -> None:
    proxy, gateway, _ = proxied
    headers = {"Authorization": f"Bearer {gateway.token}"}
    with gateway.client() as api:
        assert api.submit(_add(1, 2), wait=30).result == 3

        proxy.cut()
        for method, path, body in (
            ("GET", "/v1/jobs/summary", None),
            ("GET", "/v1/jobs?limit=5", None),
            ("POST", "/v1/jobs", _add(2, 3).model_dump(mode="json", exclude_none=True)),
        ):
            reply = httpx.request(method, gateway.url + path, json=body, headers=headers)
            assert reply.status_code == 503, (path, reply.status_code, reply.text)
            assert reply.headers["retry-after"] == "1"
            assert "database" in reply.json()["detail"]
        with pytest.raises(GatewayUnavailable):  # what the SDK and workers retry
            api.summary()

        proxy.open()
        deadline = time.monotonic() + 30
        while True:  # the first calls may still meet a connection cut before the pool knew
            with contextlib.suppress(GatewayUnavailable):
                api.summary()
                break
            assert time.monotonic() < deadline, "the gateway never recovered"
            time.sleep(0.2)
        # The worker kept retrying through the outage: it still takes and finishes jobs.
        job = api.submit(_add(20, 22), wait=60)
        assert job.state is JobState.succeeded and job.result == 42
