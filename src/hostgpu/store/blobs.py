"""Where a store keeps blob bytes: files beside a SQLite database, or chunks inside PostgreSQL.

Both hash what they write as they write it, so a blob's bytes always match its digest: a
mismatch is refused (:class:`~hostgpu.errors.InvalidInput`) and nothing is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Connection, delete, insert, select

from hostgpu.errors import InvalidInput, NotFound
from hostgpu.store.schema import blob_chunks

CHUNK = 1024 * 1024


def mismatch(digest: str, actual: str) -> InvalidInput:
    return InvalidInput(
        f"the uploaded bytes hash to {actual}, not {digest}: the upload was cut short or the "
        "digest is wrong; upload again"
    )


class FileBlobs:
    """Blob files under a folder (``ab/abcdef…``), written through a temporary file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def write(self, conn: Connection, digest: str, source: BinaryIO) -> int:
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        sha = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                for block in iter(lambda: source.read(CHUNK), b""):
                    sha.update(block)
                    size += len(block)
                    out.write(block)
            if sha.hexdigest() != digest:
                raise mismatch(digest, sha.hexdigest())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return size

    def read(self, conn: Connection, digest: str) -> Iterator[bytes]:
        try:
            handle = self.path(digest).open("rb")
        except FileNotFoundError:
            raise NotFound(f"no blob {digest}") from None
        with handle:
            yield from iter(lambda: handle.read(CHUNK), b"")

    def delete(self, conn: Connection, digests: list[str]) -> None:
        for digest in digests:
            with contextlib.suppress(FileNotFoundError):
                self.path(digest).unlink()


class TableBlobs:
    """Blob bytes as 1 MiB rows in ``blob_chunks``: every gateway of the database serves them."""

    def write(self, conn: Connection, digest: str, source: BinaryIO) -> int:
        sha = hashlib.sha256()
        size = 0
        for seq, block in enumerate(iter(lambda: source.read(CHUNK), b"")):
            sha.update(block)
            size += len(block)
            conn.execute(insert(blob_chunks).values(digest=digest, seq=seq, data=block))
        if sha.hexdigest() != digest:
            raise mismatch(digest, sha.hexdigest())  # the transaction rolls the rows back
        return size

    def read(self, conn: Connection, digest: str) -> Iterator[bytes]:
        query = (
            select(blob_chunks.c.data)
            .where(blob_chunks.c.digest == digest)
            .order_by(blob_chunks.c.seq)
            .execution_options(yield_per=4)
        )
        for row in conn.execute(query):
            yield bytes(row.data)

    def delete(self, conn: Connection, digests: list[str]) -> None:
        if digests:
            conn.execute(delete(blob_chunks).where(blob_chunks.c.digest.in_(digests)))
