"""Explain queued jobs: which ones no live worker can run, and why."""

from __future__ import annotations

import time

from hostgpu.capabilities import Capabilities
from hostgpu.jobs import Job, JobState
from hostgpu.routing import waiting_reason
from hostgpu.store import Store


class WaitingExplainer:
    """Caches the live workers for a second: listing jobs must not re-read them per row."""

    def __init__(self, store: Store, ttl: float = 1.0) -> None:
        self.store = store
        self.ttl = ttl
        self._workers: list[Capabilities] = []
        self._read_at = -1e9

    def cached(self) -> list[Capabilities] | None:
        """The live workers when the cache is fresh (no store read: the event loop may ask),
        else None."""
        return self._workers if time.monotonic() - self._read_at <= self.ttl else None

    def workers(self) -> list[Capabilities]:
        now = time.monotonic()
        if now - self._read_at > self.ttl:
            self._workers = [w.capabilities for w in self.store.list_workers(alive_only=True)]
            self._read_at = now
        return self._workers

    def invalidate(self) -> None:
        self._read_at = -1e9

    def annotate(self, jobs: list[Job]) -> list[Job]:
        if not any(j.state is JobState.queued for j in jobs):
            return jobs
        workers = self.workers()
        for job in jobs:
            if job.state is JobState.queued:
                job.waiting = waiting_reason(
                    job.requirements,
                    job.function,
                    workers,
                    fallback=job.fallback,
                    resolved=job.resolved,
                )
        return jobs
