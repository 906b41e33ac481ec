"""The RQ job function for the peer benchmark (workers import it by path ``rq_tasks.noop``)."""

from __future__ import annotations

from typing import Any


def noop(x: Any = None) -> Any:
    """Return the argument, like ``hostgpu.builtin.noop``."""
    return x
