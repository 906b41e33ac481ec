"""The durable job store: one interface of domain verbs, a SQLite and a PostgreSQL backend."""

from __future__ import annotations

from hostgpu.store.interface import HeartbeatResult, JobFilter, NewJob, Pending, Store


def open_store(url: str, **options: object) -> Store:
    """Open (and migrate) the store at ``url``: ``sqlite:///path`` or ``postgresql://…``."""
    if url.startswith("sqlite"):
        from hostgpu.store.sqlite import SQLiteStore

        return SQLiteStore(url, **options)  # type: ignore[arg-type]
    if url.startswith(("postgresql", "postgres")):
        from hostgpu.store.postgres import PostgresStore

        return PostgresStore(url, **options)  # type: ignore[arg-type]
    from hostgpu.errors import ConfigError

    raise ConfigError(
        f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST/DB"
    )


__all__ = ["HeartbeatResult", "JobFilter", "NewJob", "Pending", "Store", "open_store"]
