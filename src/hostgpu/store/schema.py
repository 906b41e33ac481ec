"""Table definitions (SQLAlchemy Core). Alembic migrations create them; see migrations/."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)

metadata = MetaData()

# Times are UNIX seconds (float): portable across both backends and cheap to compare.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("function", String(300), nullable=False),
    Column("module", String(300), nullable=False),
    Column("payload", Text),
    Column("serializer", String(16), nullable=False, server_default="json"),
    Column("gpu_kind", String(16), nullable=False),
    Column("gpu_name", String(100)),
    Column("min_memory_gb", Float),
    Column("labels", Text),
    Column("fallback", String(16)),
    Column("fallback_at", Float),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("timeout_s", Float, nullable=False),
    Column("max_retries", Integer, nullable=False),
    Column("idempotency_key", String(200), unique=True),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("lost", Integer, nullable=False, server_default="0"),
    Column("resolved", Boolean, nullable=False, server_default=text("true")),
    Column("requested", Text),
    Column("inputs", Text),
    Column("lease_token", String(32)),
    Column("lease_expires_at", Float),
    Column("worker_id", String(32)),
    Column("device", String(100)),
    Column("fallback_used", Boolean, nullable=False, server_default=text("false")),
    Column("result", Text),
    Column("error", Text),
    Column("timings", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("run_after", Float, nullable=False),
    Column("finished_at", Float),
)

# The lease reads queued jobs lane by lane (one per function), each in lease order; a
# partial index keeps that proportional to the queued jobs, not the history.
Index(
    "ix_jobs_lane",
    jobs.c.function,
    jobs.c.priority.desc(),
    jobs.c.run_after,
    jobs.c.created_at,
    sqlite_where=jobs.c.state == "queued",
    postgresql_where=jobs.c.state == "queued",
)
# Requeueing expired leases looks only at active jobs (migration 0002 says why this is
# not a (state, expiry) index).
Index(
    "ix_jobs_active_expiry",
    jobs.c.lease_expires_at,
    sqlite_where=jobs.c.state.in_(["leased", "running"]),
    postgresql_where=jobs.c.state.in_(["leased", "running"]),
)
# Jobs waiting for their function's declaration (normally none).
Index(
    "ix_jobs_pending",
    jobs.c.created_at,
    sqlite_where=(jobs.c.resolved == false()) & (jobs.c.state == "queued"),
    postgresql_where=(jobs.c.resolved == false()) & (jobs.c.state == "queued"),
)
Index("ix_jobs_finished", jobs.c.finished_at)
Index("ix_jobs_created", jobs.c.created_at)

attempts = Table(
    "attempts",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("worker_id", String(32)),
    Column("device", String(100)),
    Column("lease_token", String(32)),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("outcome", String(32)),
    Column("error", Text),
)

workers = Table(
    "workers",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("capabilities", Text, nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("state", String(16), nullable=False),
)

# What workers publish: each function's declared options (the latest registration wins).
functions = Table(
    "functions",
    metadata,
    Column("function", String(300), primary_key=True),
    Column("module", String(300), nullable=False, index=True),
    Column("options", Text, nullable=False),
    Column("worker_id", String(32)),
    Column("updated_at", Float, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
)

# Files jobs need (content-addressed); the bytes live in blob_chunks (PostgreSQL) or in files
# beside a SQLite database.
blobs = Table(
    "blobs",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("ix_blobs_created", blobs.c.created_at)
blob_chunks = Table(
    "blob_chunks",
    metadata,
    Column("digest", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)
job_inputs = Table(
    "job_inputs",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("digest", String(64), primary_key=True),
)
Index("ix_job_inputs_digest", job_inputs.c.digest)
