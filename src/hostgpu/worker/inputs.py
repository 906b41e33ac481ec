"""A worker's cache of job inputs: the blobs it fetched, kept for the next job that needs the
same file, and trimmed to a size, least recently used first.

Files live at ``<HOSTGPU_HOME>/inputs/<digest[:2]>/<digest>``. A file is named by its
SHA-256, and a fetch writes a hidden ``.part`` file and renames it once checked, so a present
file is whole. A job that finds its file present marks it used (its modification time).
After each fetch, and after a failed one, the cache drops the least recently used inputs
until it fits ``HOSTGPU_INPUTS_CACHE_BYTES``, never one that a job this worker holds needs.
Without a bound the folder grew with every distinct input for as long as the machine served jobs.
The bound is per worker: workers that share a ``HOSTGPU_HOME`` do not know each other's
jobs, so give each worker a home of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat as stat_module
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("hostgpu.worker")

#: The default bound on a worker's cached inputs (``HOSTGPU_INPUTS_CACHE_BYTES``).
DEFAULT_INPUTS_CACHE_BYTES = 20 * 1024**3
#: A ``.part`` file untouched this long is left from a fetch that died (a live fetch writes
#: at least a chunk a minute or fails).
STALE_PART_S = 3600.0
_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass
class _Cached:
    """One input and what hangs off it: the ``<digest>`` file, its hard links under its
    owner's name (``<digest>.named/<name>``, ``<digest>.pdf``: the ingest pipeline's), so
    that dropping it frees the bytes."""

    digest: str
    paths: list[Path] = field(default_factory=list)
    inodes: dict[int, int] = field(default_factory=dict)  # inode -> size: hard links once
    used_at: float = 0.0

    @property
    def size(self) -> int:
        return sum(self.inodes.values())

    def add(self, path: Path, stat: os.stat_result) -> None:
        self.inodes[stat.st_ino] = stat.st_size
        self.used_at = max(self.used_at, stat.st_mtime)

    def remove(self) -> None:
        for path in self.paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


class InputCache:
    """The cached inputs under ``root``, at most ``max_bytes`` of them once trimmed.

    ``lock`` orders a trim against a job that finds its inputs present: the worker holds it
    while it records a new lease and looks for the lease's files, and a trim holds it from
    reading which inputs are held to the last file it drops. A file a job found is then
    either kept (held) or was gone before the job looked (and is fetched again)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.lock = threading.Lock()

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def missing(self, digests: Iterable[str]) -> list[str]:
        """The digests not cached yet; the cached ones are marked used now."""
        absent = []
        for digest in digests:
            path = self.path(digest)
            try:
                os.utime(path)
            except FileNotFoundError:
                absent.append(digest)
            except OSError:  # not ours to touch (a read-only mount, another owner): still there
                if not path.is_file():
                    absent.append(digest)
        return absent

    def trim(self, held: Callable[[], Collection[str]]) -> int:
        """Drop the least recently used inputs (not those ``held()`` names, read under the
        lock) until the cache fits its bound, and dead fetches' leftovers; return the bytes
        freed."""
        with self.lock:
            keep = held()
            cached = self._cached()
            total = sum(c.size for c in cached)
            freed = 0
            for entry in sorted(cached, key=lambda c: c.used_at):
                if total - freed <= self.max_bytes:
                    break
                if entry.digest not in keep:
                    entry.remove()
                    freed += entry.size
        if freed:
            log.info(
                "input cache: dropped %.1f MB of least recently used files (bound %.1f MB)",
                freed / 1e6,
                self.max_bytes / 1e6,
            )
        return freed

    def _cached(self) -> list[_Cached]:
        found: dict[str, _Cached] = {}
        stale_before = time.time() - STALE_PART_S
        try:
            folders = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        for folder in folders:
            for path, stat in _entries(folder):
                name = path.name
                if name.startswith("."):  # a fetch's .part file
                    if name.endswith(".part") and stat.st_mtime < stale_before:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                    continue
                digest = name[:64]
                if not _DIGEST.fullmatch(digest):
                    continue  # not the cache's
                entry = found.setdefault(digest, _Cached(digest))
                entry.paths.append(path)
                if stat_module.S_ISDIR(stat.st_mode):
                    for inner, inner_stat in _entries(path):
                        if stat_module.S_ISREG(inner_stat.st_mode):
                            entry.add(inner, inner_stat)
                else:
                    entry.add(path, stat)
        return list(found.values())


def _entries(folder: str | Path) -> list[tuple[Path, os.stat_result]]:
    """A folder's entries with their own (not a link's target's) status; [] once gone."""
    out = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as it:
        for entry in it:
            with contextlib.suppress(FileNotFoundError):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False)))
    return out


__all__ = ["DEFAULT_INPUTS_CACHE_BYTES", "InputCache"]
