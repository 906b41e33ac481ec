"""Per-token limits on the inference API: requests per minute and requests at once.

Counted on each gateway (a fleet of N gateways admits up to N times the rate): enough to keep
one client from starving the others, without a store write per request.
"""

from __future__ import annotations

import time
import weakref

from hostgpu.inference.errors import RateLimited


class Slot:
    """One running request's place in its token's concurrency limit."""


class TokenQuotas:
    def __init__(self, per_minute: int, concurrent: int) -> None:
        self.per_minute = per_minute
        self.concurrent = concurrent
        #: Token id → (allowance left, when it was last topped up): a token bucket.
        self._buckets: dict[str, tuple[float, float]] = {}
        #: Token id → the requests it has running. Weak: a request whose response never ran
        #: (the client left before it started) frees its slot when it is garbage.
        self._active: dict[str, weakref.WeakSet[Slot]] = {}

    def admit(self, token_id: str, request: Slot) -> None:
        """Count ``request`` against ``token_id``'s limits (RateLimited when over them) until
        :meth:`release`, or until it is garbage."""
        now = time.monotonic()
        left, at = self._buckets.get(token_id, (float(self.per_minute), now))
        left = min(float(self.per_minute), left + (now - at) * self.per_minute / 60.0)
        active = self._active.setdefault(token_id, weakref.WeakSet())
        if len(active) >= self.concurrent:
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
        active.add(request)

    def release(self, token_id: str, request: Slot) -> None:
        active = self._active.get(token_id)
        if active is not None:
            active.discard(request)
            if not active:
                del self._active[token_id]
