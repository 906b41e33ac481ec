"""Caches in front of the store's figures, so many dashboards cost about what one does.

- :class:`ThroughputCache`: a bucket whose minute is over (plus a margin for late commits and
  clock skew between gateways) never changes again, so it is read from the store once; a
  refresh reads only the newest buckets. A dashboard refreshed every 10 s then reads about
  one minute of finished jobs instead of an hour's.
- :class:`TTLCache`: the other figures for a second, shared by every viewer of this gateway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from hostgpu.stats import ThroughputBucket
from hostgpu.store import Store

T = TypeVar("T")

#: A bucket is final once it ended this long ago: reports commit within milliseconds of the
#: finish time they record, and gateways' clocks agree to within a few seconds.
SEAL_S = 15.0


class ThroughputCache:
    def __init__(self, store: Store, seal_s: float = SEAL_S) -> None:
        self.store = store
        self.seal_s = seal_s
        self._lock = threading.Lock()
        # bucket size → (known_from, sealed_until, {start: bucket}): every bucket with
        # known_from <= start < sealed_until is final and cached (empty ones are absent).
        self._sealed: dict[float, tuple[float, float, dict[float, ThroughputBucket]]] = {}

    def get(
        self, since: float, bucket_s: float, now: float | None = None
    ) -> list[ThroughputBucket]:
        """Buckets from ``since`` (a multiple of ``bucket_s``) to now, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            known_from, until, cached = self._sealed.get(bucket_s, (since, since, {}))
        if not known_from <= since <= until:
            known_from, until, cached = since, since, {}  # a longer window: read it all
        fresh = self.store.throughput(until, bucket_s)
        seal = (now - self.seal_s) // bucket_s * bucket_s  # buckets starting before this are final
        keep = {start: b for start, b in cached.items() if start >= since}
        keep.update({b.start: b for b in fresh if b.start < seal})
        with self._lock:
            self._sealed[bucket_s] = (since, max(until, seal), keep)
        old = [b for start, b in sorted(keep.items()) if start < until]
        return old + [b for b in fresh if b.start >= until]


class TTLCache:
    """Values for ``ttl`` seconds, by key."""

    def __init__(self, ttl: float = 1.0) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._values: dict[Hashable, tuple[float, Any]] = {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._values.get(key)
        if hit is not None and now - hit[0] < self.ttl:
            value: T = hit[1]
            return value
        value = compute()
        with self._lock:
            self._values[key] = (now, value)
            if len(self._values) > 64:  # keys are a handful of query strings
                self._values.clear()
        return value
