"""Leasing in the commit: the jobs a commit stores are leased in the same thread, right
after it, for the long polls already waiting for such jobs.

Why: announced, a stored job wakes a waiting poll, which then reads the store in a thread of
its own. Under a burst that read waited for the interpreter's lock while the event loop
answered the burst's requests: 3-6 ms for about 1 ms of work, at 8 chat requests on 2 cores
(issue 12's trace), before a model server had any of them. Leased in the commit's thread,
the jobs go out on the channel before the requests are answered.

Which polls: those that ``Notifier.runnable`` would wake for the jobs (one fitting poll per
job, the warm model server first), if they are waiting at that moment. One busy reading the
store is woken by the announcement instead, as before: leased for here, it could take more
than its ``max_jobs`` in all. A job held for a better server that is between two polls is
left to the announcement, as are jobs no claimed poll took (the store leases by priority, so
a poll may take older jobs).
The leases are taken after the commit, so a job is durable before any worker hears of it;
a poll that ended meanwhile hands its leases back at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from hostgpu.gateway.deps import Gateway
from hostgpu.gateway.notify import LeaseWaiter, Runnable
from hostgpu.gateway.protocol import hand_back
from hostgpu.jobs import Lease
from hostgpu.store.interface import NewJob

log = logging.getLogger("hostgpu.gateway")


class Handoff:
    """``claim`` on the event loop before the commit, ``lease`` in its thread after it,
    ``hand`` on the event loop once it returns (always, even when the commit failed)."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw

    def claim(self, jobs: Sequence[NewJob]) -> list[LeaseWaiter]:
        # As asked: a CPU fallback opens only after its grace (see intake.announce).
        runnable = [Runnable(j.function, j.options.requirements) for j in jobs if j.resolved]
        if not runnable:
            return []
        try:
            return self._gw.notifier.claim(runnable)
        except Exception:  # the announcement after the commit wakes the polls instead
            log.exception("choosing the polls to lease %d new jobs for failed", len(runnable))
            return []

    def lease(self, claimed: Sequence[LeaseWaiter], jobs: int) -> list[list[Lease]]:
        """Lease for the claimed polls in turn, until ``jobs`` leases are taken (the first
        poll usually takes the lot; the rest are handed nothing and read the store)."""
        leases: list[list[Lease]] = []
        taken = 0
        for waiter in claimed:
            got: list[Lease] = []
            try:
                if taken < jobs:
                    got = self._gw.store.lease(
                        waiter.worker_id,
                        waiter.caps,
                        max_jobs=waiter.max_jobs,
                        lease_seconds=self._gw.settings.lease_seconds,
                        probe=False,
                    )
            except Exception as exc:  # the poll reads the store itself, as when woken
                log.warning("leasing for worker %s in a commit failed: %s", waiter.worker_id, exc)
            leases.append(got)
            taken += len(got)
        return leases

    def hand(self, claimed: Sequence[LeaseWaiter], leases: Sequence[list[Lease]]) -> set[str]:
        """Give each claimed poll its leases (none where the commit failed); returns the
        ids of the jobs a poll took. Leases whose poll has ended are handed back: released,
        their jobs wake the waiting polls again."""
        leased: set[str] = set()
        for at, waiter in enumerate(claimed):
            taken = leases[at] if at < len(leases) else []
            if waiter.hand(taken):  # the poll has ended
                hand_back(self._gw, taken)
            else:
                leased.update(lease.job_id for lease in taken)
        if leased:  # for whoever follows new jobs (the dashboard): none is announced
            self._gw.notifier.notify("enqueued")
        return leased


__all__ = ["Handoff"]
