"""A worker's cache of job inputs: the blobs it fetched, kept for the next job that needs the
same file, and trimmed to a size, least recently used first.

Files live at ``<HOSTGPU_HOME>/inputs/<digest[:2]>/<digest>``. A file is named by its
SHA-256, and a fetch writes ``.<digest>.part`` and renames it once checked, so a present file
is whole. A job that finds its file present marks it used (its modification time). After
each fetch the cache drops the least recently used files until it fits
``HOSTGPU_INPUTS_CACHE_BYTES``, never one that a job this worker holds needs. Without a
bound the folder grew with every distinct input for as long as the machine served jobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hostgpu.worker")

#: The default bound on a worker's cached inputs (``HOSTGPU_INPUTS_CACHE_BYTES``).
DEFAULT_INPUTS_CACHE_BYTES = 20 * 1024**3
#: A ``.part`` file untouched this long is left from a fetch that died (a live fetch writes
#: at least a chunk a minute or fails).
STALE_PART_S = 3600.0


@dataclass(frozen=True)
class _Cached:
    digest: str
    path: Path
    size: int
    used_at: float


class InputCache:
    """The cached inputs under ``root``, at most ``max_bytes`` of them once trimmed."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests not cached yet; the cached ones are marked used now."""
        absent = []
        for digest in digests:
            try:
                os.utime(self.path(digest))
            except FileNotFoundError:
                absent.append(digest)
        return absent

    def trim(self, keep: Collection[str]) -> int:
        """Drop the least recently used files (not those in ``keep``) until the cache fits its
        bound, and fetches' leftovers; return the bytes freed."""
        files = self._files()
        total = sum(f.size for f in files)
        freed = 0
        for cached in sorted(files, key=lambda f: f.used_at):
            if total - freed <= self.max_bytes:
                break
            if cached.digest in keep:
                continue
            with contextlib.suppress(FileNotFoundError):  # another fetch's trim took it
                cached.path.unlink()
                freed += cached.size
        if freed:
            log.info(
                "input cache: dropped %.1f MB of least recently used files (bound %.1f MB)",
                freed / 1e6,
                self.max_bytes / 1e6,
            )
        return freed

    def _files(self) -> list[_Cached]:
        found: list[_Cached] = []
        stale_before = time.time() - STALE_PART_S
        try:
            folders = [e for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return found
        for folder in folders:
            with contextlib.suppress(FileNotFoundError), os.scandir(folder.path) as entries:
                for entry in entries:
                    try:
                        stat = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if entry.name.endswith(".part"):
                        if stat.st_mtime < stale_before:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(entry.path)
                        continue
                    if entry.is_file(follow_symlinks=False):
                        found.append(
                            _Cached(entry.name, Path(entry.path), stat.st_size, stat.st_mtime)
                        )
        return found


__all__ = ["DEFAULT_INPUTS_CACHE_BYTES", "InputCache"]
