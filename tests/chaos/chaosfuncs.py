"""The chaos run's job function and its execution table (imported by path on the workers).

Every execution of :func:`record` inserts one row into ``chaos_executions``, a table the
job store knows nothing about: on PostgreSQL it lives in the same database (written with
psycopg directly), on SQLite in a separate file (stdlib ``sqlite3``). Rows minus distinct
keys is the number of duplicate executions, which at-least-once allows; the job store
must still hold exactly one result per job.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import hostgpu

TABLE = "chaos_executions"
# One connection per child process: the warm pool keeps children between jobs, so a
# job costs an INSERT, not a connection.
_conn: Any = None
_conn_url = ""


def _sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def connect(url: str) -> Any:
    """An autocommit connection to the execution table's database."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(_sqlite_path(url), timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def create_table(url: str) -> None:
    """Create the (empty) execution table; call before the run."""
    conn = connect(url)
    try:
        if url.startswith("sqlite:///"):
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} "
                "(key TEXT NOT NULL, job_id TEXT, pid INTEGER NOT NULL, at REAL NOT NULL)"
            )
        else:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} "
                "(key TEXT NOT NULL, job_id TEXT, pid INTEGER NOT NULL, "
                "at DOUBLE PRECISION NOT NULL)"
            )
    finally:
        conn.close()


def count_executions(url: str) -> tuple[int, int]:
    """(rows, distinct keys) in the execution table."""
    conn = connect(url)
    try:
        row = conn.execute(f"SELECT COUNT(*), COUNT(DISTINCT key) FROM {TABLE}").fetchone()
        return int(row[0]), int(row[1])
    finally:
        conn.close()


def executed_keys(url: str) -> set[str]:
    conn = connect(url)
    try:
        return {r[0] for r in conn.execute(f"SELECT DISTINCT key FROM {TABLE}").fetchall()}
    finally:
        conn.close()


def _insert(db_url: str, key: str) -> None:
    global _conn, _conn_url
    marker = "?" if db_url.startswith("sqlite:///") else "%s"
    sql = f"INSERT INTO {TABLE} (key, job_id, pid, at) VALUES ({', '.join([marker] * 4)})"
    row = (key, hostgpu.job_id(), os.getpid(), time.time())
    for attempt in range(3):
        if _conn is None or _conn_url != db_url:
            _conn, _conn_url = connect(db_url), db_url
        try:
            _conn.execute(sql, row)
            return
        except Exception:
            # A broken connection (server restart, …): reconnect and try again.
            with contextlib.suppress(Exception):
                _conn.close()
            _conn = None
            if attempt == 2:
                raise


@hostgpu.function(gpu="cpu", retries=20, timeout=30)
def record(key: str, db_url: str, sleep_s: float = 0.005) -> str:
    """Record this execution, linger a little so kills land mid-job, return the key."""
    _insert(db_url, key)
    if sleep_s > 0:
        time.sleep(sleep_s)
    return key


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"
