"""Shared fixtures: real PostgreSQL, real gateway and worker processes on 127.0.0.1."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostgpu import testing

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("HOSTGPU_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = bool(os.environ.get("CI"))


# -- PostgreSQL -------------------------------------------------------------------------------
def _pg_connect(dbname: str | None = None):  # type: ignore[no-untyped-def]
    import psycopg

    url = PG_ADMIN_URL if dbname is None else PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{dbname}"
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The admin URL of the local PostgreSQL; skipped when absent, a failure in CI."""
    try:
        _pg_connect().close()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI and is not reachable: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"hostgpu_test_{uuid.uuid4().hex[:12]}"
    with _pg_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = pg_server.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with _pg_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Gateway(testing.Gateway):
    """A gateway whose workers can import this repository's test modules."""

    def __init__(self, home: Path, database_url: str, **kw: object) -> None:
        kw.setdefault("pythonpath", str(ROOT))
        super().__init__(home, database_url, **kw)  # type: ignore[arg-type]


class Worker(testing.Worker):
    def __init__(self, gateway: testing.Gateway, **kw: object) -> None:
        kw.setdefault("imports", ("tests.e2efuncs",))
        super().__init__(gateway, **kw)  # type: ignore[arg-type]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def gateway_factory(home: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()


@pytest.fixture
def gateway(home: Path) -> Iterator[Gateway]:
    gw = Gateway(
        home,
        f"sqlite:///{home / 'hostgpu.db'}",
        env_extra={"HOSTGPU_LEASE_SECONDS": "3", "HOSTGPU_FALLBACK_GRACE_SECONDS": "2"},
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def workers(gateway: Gateway) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()


@pytest.fixture
def worker(gateway: Gateway, workers: list[Worker]) -> Worker:
    w = Worker(gateway).start()
    workers.append(w)
    return w
