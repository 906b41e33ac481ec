"""Prometheus metrics: request counters plus job counts read from the store on scrape."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from hostgpu.store import Store


class _JobCounts(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("hostgpu_jobs", "Jobs in the store by state", labels=["state"])
        for state, count in self.store.count_by_state().items():
            family.add_metric([state], count)
        yield family
        workers = GaugeMetricFamily("hostgpu_workers_alive", "Workers heartbeating now")
        workers.add_metric([], len(self.store.list_workers(alive_only=True)))
        yield workers


class Metrics:
    """One registry per app, so several apps in one process never collide."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hostgpu_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hostgpu_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 60),
        )
        self.registry.register(_JobCounts(store))
