"""When a failed or lost job runs again: the one retry rule, asked by the store's callers.

Two limits, because they count different things: ``retries`` (declared per function) counts
the job's own failures (it raised, timed out, crashed its child); ``max_lost`` counts leases
lost because a worker died or stopped heartbeating, which is not the job's fault and gets a
higher limit of its own. The decision says which limit ended a job.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Run again after ``delay_s`` seconds, or give up with ``reason``."""

    again: bool
    delay_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS's "full jitter"): a burst of failures does not
    retry in lockstep, and the mean wait is half the exponential ceiling."""

    base_s: float = 1.0
    max_s: float = 300.0
    max_lost: int = 10

    def backoff(self, failures: int) -> float:
        ceiling = min(self.max_s, self.base_s * 2 ** max(failures - 1, 0))
        return random.uniform(0, ceiling)

    def after_failure(self, failures: int, max_retries: int, *, retryable: bool) -> Decision:
        """``failures``: the job's failures so far, this one included."""
        if not retryable:
            return Decision(False, reason="the error is not retryable")
        if failures > max_retries:
            return Decision(
                False, reason=f"failed {failures} time(s); retries={max_retries} is used up"
            )
        return Decision(True, self.backoff(failures))

    def after_lost_lease(self, lost: int) -> Decision:
        """``lost``: leases this job lost so far, this one included. Re-run at once: the
        worker died, the job did nothing wrong."""
        if lost > self.max_lost:
            return Decision(
                False,
                reason=f"lost its worker {lost} time(s); HOSTGPU_MAX_LOST_LEASES={self.max_lost} "
                "is used up",
            )
        return Decision(True, 0.0)
