"""Per-token limits on the inference API: requests per minute and requests at once.

Counted on each gateway (a fleet of N gateways admits up to N times the rate): enough to keep
one client from starving the others, without a store write per request.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from hostgpu.inference.errors import RateLimited


class TokenQuotas:
    def __init__(self, per_minute: int, concurrent: int) -> None:
        self.per_minute = per_minute
        self.concurrent = concurrent
        #: Token id → (allowance left, when it was last topped up): a token bucket.
        self._buckets: dict[str, tuple[float, float]] = {}
        self._active: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, token_id: str) -> Iterator[None]:
        """One request of ``token_id`` for as long as the block runs; RateLimited when over."""
        self.admit(token_id)
        try:
            yield
        finally:
            self.release(token_id)

    def admit(self, token_id: str) -> None:
        now = time.monotonic()
        left, at = self._buckets.get(token_id, (float(self.per_minute), now))
        left = min(float(self.per_minute), left + (now - at) * self.per_minute / 60.0)
        if self._active.get(token_id, 0) >= self.concurrent:
            raise RateLimited(
                f"this token already has {self.concurrent} requests running "
                "(HOSTGPU_INFER_CONCURRENCY): wait for one to finish",
                code="concurrency_limit",
            )
        if left < 1.0:
            raise RateLimited(
                f"this token is over {self.per_minute} requests per minute "
                "(HOSTGPU_INFER_RATE_PER_MINUTE): try again in a second",
                code="rate_limit",
            )
        self._buckets[token_id] = (left - 1.0, now)
        self._active[token_id] = self._active.get(token_id, 0) + 1

    def release(self, token_id: str) -> None:
        count = self._active.get(token_id, 0) - 1
        if count > 0:
            self._active[token_id] = count
        else:
            self._active.pop(token_id, None)
