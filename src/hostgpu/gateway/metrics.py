"""Prometheus metrics: counters of what this gateway did, gauges read from the store.

Two kinds, because several gateways may share one PostgreSQL store:

- **Counters and histograms** (``hostgpu_jobs_*_total``, ``hostgpu_job_*_seconds``) count the
  transitions *this gateway process* carried out: the submission it stored, the report it
  recorded, the lease its housekeeping took back. Every transition happens in exactly one
  gateway, so summing over gateways gives the fleet's totals
  (``sum without (instance) (rate(hostgpu_jobs_succeeded_total[5m]))``); a restarted gateway
  starts again from zero, which ``rate()`` and ``increase()`` handle.
- **Gauges** (``hostgpu_jobs``, ``hostgpu_queue_*``, ``hostgpu_workers_*``) are read from the
  shared store at scrape time, so every gateway reports the same values: aggregate them with
  ``max``, never ``sum``.

The README's metrics table (docs/dashboard.md) lists every series.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hostgpu.gateway.threads import run
from hostgpu.jobs import Job, JobState, Outcome, ReportResult
from hostgpu.stats import ExpiredLease, JobFacts
from hostgpu.store import Store

log = logging.getLogger("hostgpu.gateway")

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RUN_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400)
JOB_LABELS = ("function", "requirement")
RUN_LABELS = ("function", "device")  # the histograms of finished jobs
#: Finished jobs are counted in one read per this many seconds, not one per report: the
#: report path stays as fast as without metrics, and the counters lag by at most this.
FLUSH_S = 0.5
FLUSH_BATCH = 1000


class _StoreGauges(Collector):
    """Read on every scrape: what the store holds now (the same on every gateway)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        now = time.time()
        family = GaugeMetricFamily("hostgpu_jobs", "Jobs in the store by state", labels=["state"])
        for state, count in self.store.count_by_state().items():
            family.add_metric([state], count)
        yield family

        depth = GaugeMetricFamily(
            "hostgpu_queue_depth", "Queued jobs by gpu requirement", labels=["requirement"]
        )
        oldest = GaugeMetricFamily(
            "hostgpu_queue_oldest_seconds",
            "How long the longest-waiting runnable queued job has waited, by gpu requirement "
            "(0 when every queued job waits out a retry backoff)",
            labels=["requirement"],
        )
        queued: dict[str, int] = {}
        waited: dict[str, float] = {}
        for group in self.store.queue_groups():
            gpu = group.requirements.gpu
            queued[gpu] = queued.get(gpu, 0) + group.queued
            age = now - group.oldest_runnable_at if group.oldest_runnable_at else 0.0
            waited[gpu] = max(waited.get(gpu, 0.0), age, 0.0)
        for gpu in sorted(queued):
            depth.add_metric([gpu], queued[gpu])
            oldest.add_metric([gpu], waited[gpu])
        yield depth
        yield oldest

        alive = self.store.list_workers(alive_only=True)
        workers = GaugeMetricFamily("hostgpu_workers_alive", "Workers heartbeating now")
        workers.add_metric([], len(alive))
        yield workers
        by_device = GaugeMetricFamily(
            "hostgpu_workers_alive_by_device",
            "Live workers that have a device of this kind and name",
            labels=["kind", "name"],
        )
        counts: dict[tuple[str, str], int] = {}
        for worker in alive:
            for key in {(d.kind, d.name) for d in worker.capabilities.devices}:
                counts[key] = counts.get(key, 0) + 1
        for (kind, name), count in sorted(counts.items()):
            by_device.add_metric([kind, name], count)
        yield by_device

        transactions = CounterMetricFamily(
            "hostgpu_store_transactions",
            "Store transactions this gateway process ran (scrapes included), by kind",
            labels=["kind"],
        )
        for kind, count in sorted(self.store.transactions.items()):
            transactions.add_metric([kind], count)
        yield transactions


class Metrics:
    """One registry per app, so several apps in one process never collide."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._reported: dict[str, float | None] = {}  # job id → the worker's run time
        self._flusher: asyncio.Task[None] | None = None
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "hostgpu_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        )

        def counter(name: str, text: str, labels: Sequence[str] = JOB_LABELS) -> Counter:
            return Counter(name, text, list(labels), registry=registry)

        def histogram(
            name: str, text: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, text, list(labels), registry=registry, buckets=buckets)

        self.latency = histogram(
            "hostgpu_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 60),
        )

        self.submitted = counter("hostgpu_jobs_submitted", "Jobs stored by this gateway")
        self.succeeded = counter("hostgpu_jobs_succeeded", "Jobs that succeeded")
        self.failed = counter(
            "hostgpu_jobs_failed",
            "Jobs that failed for good (no retries left, not retryable, or too many lost leases)",
        )
        self.retried = counter(
            "hostgpu_jobs_retried", "Failed attempts that were queued again for a retry"
        )
        self.cancelled = counter("hostgpu_jobs_cancelled", "Jobs cancelled")
        self.lost = counter(
            "hostgpu_jobs_lost",
            "Leases of jobs whose worker stopped heartbeating (the job is queued again, or "
            "failed when over HOSTGPU_MAX_LOST_LEASES)",
        )
        self.fallback = counter(
            "hostgpu_jobs_fallback",
            "Jobs that finished after running on the CPU fallback (fallback='cpu')",
        )
        self.leases_expired = counter(
            "hostgpu_leases_expired",
            "Leases taken back because their worker stopped heartbeating, by worker name",
            ["worker"],
        )
        self.queue_wait = histogram(
            "hostgpu_job_queue_wait_seconds",
            "From runnable (submitted, retried or handed back) to leased, for jobs that finished",
            RUN_LABELS,
            WAIT_BUCKETS,
        )
        self.run_time = histogram(
            "hostgpu_job_run_seconds",
            "Run time of jobs that finished (the worker's measure; lease to report otherwise)",
            RUN_LABELS,
            RUN_BUCKETS,
        )
        registry.register(_StoreGauges(store))

    # -- what the routes and the housekeeping loop record ---------------------------------------
    def record_submitted(self, jobs: Iterable[Job], since: float) -> None:
        """Count the jobs stored at or after ``since`` (an idempotency key that named an existing
        job returns an older one, which is not counted again)."""
        for job in jobs:
            if job.created_at.timestamp() >= since:
                self.submitted.labels(job.function, job.requirements.gpu).inc()

    def record_cancelled(self, job: Job) -> None:
        self.cancelled.labels(job.function, job.requirements.gpu).inc()

    def note_reported(self, outcomes: Sequence[Outcome], results: Sequence[ReportResult]) -> None:
        """Remember the succeeded/failed reports this gateway accepted; they are counted
        (one light read for the lot, no payloads) within :data:`FLUSH_S`. Call it on the
        event loop."""
        accepted = {r.job_id for r in results if r.accepted}
        for outcome in outcomes:
            if outcome.status in ("succeeded", "failed") and outcome.job_id in accepted:
                self._reported[outcome.job_id] = (outcome.timings or {}).get("run_s")
        if self._reported and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_S)
        batch, self._reported = self._reported, {}
        ids = list(batch)
        try:
            for start in range(0, len(ids), FLUSH_BATCH):
                facts = await run(self.store.job_facts, ids[start : start + FLUSH_BATCH])
                run_s = {k: v for k, v in batch.items() if v is not None}
                self.record_reported(facts, run_s)
        except Exception:  # metrics must never take the gateway down
            log.exception("could not record the metrics of %d finished job(s)", len(ids))
        if self._reported:  # more arrived while this batch was read
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    def record_reported(self, facts: Iterable[JobFacts], run_s: Mapping[str, float]) -> None:
        """Jobs whose succeeded/failed report this gateway just accepted."""
        for fact in facts:
            labels = (fact.function, fact.requirement)
            if fact.state == JobState.succeeded.value:
                self.succeeded.labels(*labels).inc()
            elif fact.state == JobState.failed.value:
                self.failed.labels(*labels).inc()
            else:  # queued again (or already re-leased): a retry
                self.retried.labels(*labels).inc()
                continue
            if fact.fallback_used:
                self.fallback.labels(*labels).inc()
            device = fact.device or "none"
            if fact.leased_at is not None:
                self.queue_wait.labels(fact.function, device).observe(
                    max(0.0, fact.leased_at - fact.run_after)
                )
                run = run_s.get(fact.id)
                if run is None and fact.finished_at is not None:
                    run = fact.finished_at - fact.leased_at
                if run is not None:
                    self.run_time.labels(fact.function, device).observe(max(0.0, run))

    def record_expired(self, expired: Iterable[ExpiredLease], names: Mapping[str, str]) -> None:
        for lease in expired:
            self.lost.labels(lease.function, lease.requirement).inc()
            if lease.gave_up:
                self.failed.labels(lease.function, lease.requirement).inc()
            worker = names.get(lease.worker_id or "", lease.worker_id or "unknown")
            self.leases_expired.labels(worker).inc()
