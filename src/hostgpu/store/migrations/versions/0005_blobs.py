"""Blobs: files a job needs, uploaded to the gateway, for workers that do not share the
client's disk.

- ``blobs``: one row per content (SHA-256 digest), its size and when it came;
- ``blob_chunks``: the bytes, in order, where the database holds them (PostgreSQL, so any
  gateway serves any blob); a SQLite store keeps files beside its database instead;
- ``job_inputs``: which jobs need which blobs (prune keeps a blob while a job needs it);
- ``jobs.inputs``: the digests, handed to the worker with the lease.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_blobs_created", "blobs", ["created_at"])
    op.create_table(
        "blob_chunks",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), primary_key=True),
    )
    op.create_index("ix_job_inputs_digest", "job_inputs", ["digest"])
    op.add_column("jobs", sa.Column("inputs", sa.Text))


def downgrade() -> None:
    op.drop_column("jobs", "inputs")
    op.drop_index("ix_job_inputs_digest", table_name="job_inputs")
    op.drop_table("job_inputs")
    op.drop_table("blob_chunks")
    op.drop_index("ix_blobs_created", table_name="blobs")
    op.drop_table("blobs")
