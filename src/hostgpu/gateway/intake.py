"""New jobs in: resolve and store a submission, count it, and wake the idle workers that can
run its jobs. The jobs routes, the upload hook and the group commit (its ``on_stored``) take
jobs in through these two verbs."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from hostgpu.gateway.deps import Gateway, run
from hostgpu.gateway.notify import Notifier, Runnable
from hostgpu.jobs import Job, JobSpec, JobState
from hostgpu.settings import Settings


def announce(notifier: Notifier, settings: Settings, jobs: Sequence[Job]) -> None:
    """Wake the idle workers that can run these new jobs (and again when a CPU fallback
    opens after its grace period)."""
    queued = [j for j in jobs if j.resolved and j.state is JobState.queued]
    kinds = [(j.function, j.requirements.model_dump_json(), j.fallback) for j in queued]
    distinct = {
        kind: Runnable(j.function, j.requirements, j.fallback)
        for kind, j in zip(kinds, queued, strict=True)
    }
    # One entry per kind of job, but a wake-up per job: a batch of 500 wakes up to 500
    # fitting waiters. A CPU fallback is not open yet: wake the workers that can run the job
    # as asked now (a CPU-only worker woken first would find nothing it may lease), and the
    # others when the fallback opens.
    as_asked = {kind: dataclasses.replace(r, fallback=None) for kind, r in distinct.items()}
    per_job = [as_asked[kind] for kind in kinds]
    notifier.runnable(per_job)
    fallbacks = [r for r in distinct.values() if r.fallback]
    if fallbacks:
        notifier.later(settings.fallback_grace_seconds, fallbacks)


async def store_jobs(gw: Gateway, specs: Sequence[JobSpec]) -> list[Job]:
    """Resolve and store new jobs (one thread hop for the whole submission), and count them."""
    started = time.time()
    jobs = await run(lambda: gw.store.enqueue(gw.resolver.new_jobs(specs, gw.waiting.workers())))
    gw.metrics.record_submitted(jobs, started)
    return jobs
