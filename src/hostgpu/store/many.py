"""executemany through the driver, for the statements a busy gateway runs most.

SQLAlchemy prepares each row of an executemany in Python (its parameter dictionary, bind
processors, key checks): about 7 µs a row, the largest single cost of a busy gateway's
writes, since an enqueue, a lease and a report each write tens of rows a statement. Here a
statement is compiled once per dialect and set of keys, and each row becomes a tuple (or a
dictionary, for drivers with named parameters) handed to the driver's own executemany. It
gives the same SQL and the same values: the statement's literal values and the bind
processors of its types are applied as SQLAlchemy would. It skips Python-side column
defaults, which the tables these statements write do not have (they use server defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from sqlalchemy import Connection
from sqlalchemy.sql.dml import UpdateBase


class _Compiled(NamedTuple):
    sql: str
    #: The parameters in order: name, whether the statement fixes its value, that value
    #: (already processed), and the bind processor for values the rows give.
    params: tuple[tuple[str, bool, Any, Callable[[Any], Any] | None], ...]
    positional: bool


class Many:
    """Compiled statements, by statement, dialect and row keys (statements built once, at
    module level: the cache holds them)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[UpdateBase, str, tuple[str, ...]], _Compiled] = {}

    def run(
        self, conn: Connection, statement: UpdateBase, rows: Sequence[Mapping[str, Any]]
    ) -> None:
        """Run ``statement`` once per row of ``rows``, which all have the same keys."""
        if not rows:
            return
        keys = tuple(rows[0])
        if any(tuple(row) != keys for row in rows):  # not one shape: SQLAlchemy sorts it out
            conn.execute(statement, rows)
            return
        compiled = self._cache.get((statement, conn.dialect.name, keys))
        if compiled is None:
            compiled = self._cache[(statement, conn.dialect.name, keys)] = _compile(
                conn, statement, keys
            )
        params = compiled.params
        if compiled.positional:
            values: list[Any] = [
                tuple(
                    fixed if given else row[name] if process is None else process(row[name])
                    for name, given, fixed, process in params
                )
                for row in rows
            ]
        else:
            values = [
                {
                    name: fixed if given else row[name] if process is None else process(row[name])
                    for name, given, fixed, process in params
                }
                for row in rows
            ]
        conn.exec_driver_sql(compiled.sql, values)


def _compile(conn: Connection, statement: UpdateBase, keys: tuple[str, ...]) -> _Compiled:
    dialect = conn.dialect
    compiled = statement.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
    if compiled.positiontup is not None:
        names = list(compiled.positiontup)
    else:
        names = list(dict.fromkeys(compiled.bind_names.values()))
    params = []
    for name in names:
        bind = compiled.binds[name]
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if bind.required:
            params.append((name, False, None, process))
        else:  # a value written in the statement itself
            fixed = bind.effective_value
            params.append((name, True, process(fixed) if process else fixed, None))
    return _Compiled(compiled.string, tuple(params), compiled.positiontup is not None)
