"""Batches for a sender thread: what piled up while the last request was in flight.

The worker's reporter and the model server's streamer each send from one thread: it blocks
for the first item, then takes every other one already waiting, so one request carries all
that arrived while the previous one travelled (a busy worker sends fewer, larger requests; an
idle one sends each item at once). ``None`` on the queue is the close signal: the batch it
ends is the last.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


def batches(source: queue.Queue[T | None], most: int | None = None) -> Iterator[list[T]]:
    """Yield lists of at most ``most`` items (no limit when None) until ``None`` arrives."""
    while True:
        first = source.get()
        if first is None:
            return
        batch = [first]
        closed = False
        while most is None or len(batch) < most:
            try:
                item = source.get_nowait()
            except queue.Empty:
                break
            if item is None:
                closed = True
                break
            batch.append(item)
        yield batch
        if closed:
            return
