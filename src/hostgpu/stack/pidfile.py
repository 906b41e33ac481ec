"""One `hostgpu up` per HOSTGPU_HOME: a pid file that says who runs it, for `hostgpu down`.

The file holds the pid and the process's start time (psutil's ``create_time``), so a stale
file whose pid was reused by another program is told apart from a live ``up``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import psutil

from hostgpu.errors import ConfigError


def _alive(record: dict[str, float]) -> psutil.Process | None:
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["started"])) > 1.0:
            return None  # the pid was reused: the `up` that wrote the file is gone
        return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def running(path: Path) -> psutil.Process | None:
    """The live process recorded in ``path``, or None (no file, unreadable, or stale)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return _alive(record) if isinstance(record, dict) else None


def claim(path: Path) -> None:
    """Record this process in ``path``; refuse when a live one already holds it."""
    holder = running(path)
    if holder is not None and holder.pid != os.getpid():
        raise ConfigError(
            f"hostgpu up already runs for this HOSTGPU_HOME (pid {holder.pid}): use it, stop "
            "it with `hostgpu down`, or set HOSTGPU_HOME to another folder"
        )
    me = psutil.Process()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": me.pid, "started": me.create_time()}))
    tmp.replace(path)  # atomic: a reader sees the old record or the new, never half


def release(path: Path) -> None:
    """Remove ``path`` if it still names this process."""
    holder = running(path)
    if holder is None or holder.pid == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
