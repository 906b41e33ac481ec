"""SQLite backend: one file, WAL journal, writers serialised with BEGIN IMMEDIATE."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url

from hostgpu.store.blobs import FileBlobs
from hostgpu.store.sql import SQLStore


class _IdList(TypeDecorator[list[str]]):
    """A list of ids bound as one JSON array (for ``json_each``)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Any) -> str | None:
        return None if value is None else json.dumps(list(value))


class SQLiteStore(SQLStore):
    _dialect_insert = staticmethod(sqlite_insert)

    def _ids_in(self, column: Any) -> Any:
        # One JSON array parameter, unpacked by json_each, not a placeholder per id: the
        # statement's text is the same for any number of ids (an expanding IN is rendered
        # again for each execution: 5% of a busy gateway's time), and SQLite still looks
        # each id up in the primary key.
        ids = func.json_each(bindparam("b_ids", type_=_IdList())).table_valued("value")
        return column.in_(select(ids.c.value))

    def _create_engine(self, url: str) -> Engine:
        parsed = make_url(url)
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_size=16,
            max_overflow=16,
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's BEGIN below be the only transaction control: pysqlite's
            # own implicit BEGIN is deferred and would allow lost-update races.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.get_execution_options().get("hostgpu_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                # Take the write lock up front: two lessees can never read the same
                # queued rows and both update them.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[Connection]:
        # A read transaction (BEGIN, deferred) is a snapshot already.
        self.transactions["read"] += 1
        with self._translated(), self.engine.connect() as conn:
            yield conn.execution_options(hostgpu_readonly=True)

    def _position(self, haystack: Any, needle: Any) -> Any:
        return func.instr(haystack, needle)

    def _blobs(self) -> FileBlobs:
        # Files beside the database: one gateway per SQLite store, and no bytes in its WAL.
        database = make_url(self.url).database or ""
        if database in ("", ":memory:"):
            return FileBlobs(Path(tempfile.gettempdir()) / f"hostgpu-blobs-{os.getpid()}")
        return FileBlobs(Path(database).expanduser().resolve().parent / "blobs")
