"""The store interface, at the level of domain verbs.

Core code (gateway, CLI) talks only to this; it never sees a database driver.
Implementations: :mod:`hostgpu.store.sqlite` and :mod:`hostgpu.store.postgres`,
both built on the shared SQLAlchemy Core code in :mod:`hostgpu.store.sql`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hostgpu.capabilities import Capabilities
from hostgpu.jobs import Job, JobSpec, JobState, Lease, Outcome

Scope = Literal["admin", "submit", "worker"]
SCOPES: tuple[Scope, ...] = ("admin", "submit", "worker")


@dataclass(frozen=True)
class TokenInfo:
    id: str
    name: str
    scope: Scope
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class WorkerRecord:
    id: str
    capabilities: Capabilities
    registered_at: float
    last_seen: float
    state: str
    alive: bool


@dataclass(frozen=True)
class ReportResult:
    """What became of one reported outcome."""

    job_id: str
    accepted: bool
    reason: str | None = None


@dataclass(frozen=True)
class HeartbeatResult:
    #: Jobs the worker must stop: cancelled, or leased again after the worker's lease lapsed.
    lost: list[str]


class Store(abc.ABC):
    """Durable jobs, workers and tokens."""

    # -- jobs -----------------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(self, specs: Sequence[JobSpec]) -> list[Job]:
        """Add jobs; a spec whose idempotency key exists returns the existing job."""

    @abc.abstractmethod
    def get(self, job_id: str, *, history: bool = False) -> Job:
        """One job (raises NotFound)."""

    @abc.abstractmethod
    def get_many(self, job_ids: Sequence[str], *, terminal_only: bool = False) -> list[Job]:
        """The jobs among ``job_ids`` that exist (optionally only finished ones)."""

    @abc.abstractmethod
    def list_jobs(
        self, *, state: JobState | None = None, limit: int = 100, before: float | None = None
    ) -> list[Job]:
        """Newest first."""

    @abc.abstractmethod
    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state."""

    @abc.abstractmethod
    def lease(
        self, worker_id: str, caps: Capabilities, *, max_jobs: int, lease_seconds: float
    ) -> list[Lease]:
        """Hand up to ``max_jobs`` runnable jobs that ``caps`` satisfies to the worker."""

    @abc.abstractmethod
    def heartbeat(
        self, worker_id: str, leases: Sequence[tuple[str, str]], *, lease_seconds: float
    ) -> HeartbeatResult:
        """Mark the worker alive and extend the leases it still holds."""

    @abc.abstractmethod
    def report(self, worker_id: str, outcomes: Sequence[Outcome]) -> list[ReportResult]:
        """Record started / succeeded / failed / released outcomes, fenced by lease token."""

    def complete(
        self, job_id: str, lease_token: str, result: Any, *, device: str | None = None
    ) -> ReportResult:
        outcome = Outcome(
            job_id=job_id, lease_token=lease_token, status="succeeded", result=result, device=device
        )
        return self.report("", [outcome])[0]

    def fail(
        self, job_id: str, lease_token: str, error: dict[str, Any], *, retryable: bool = True
    ) -> ReportResult:
        outcome = Outcome(
            job_id=job_id,
            lease_token=lease_token,
            status="failed",
            error=error,
            retryable=retryable,
        )
        return self.report("", [outcome])[0]

    @abc.abstractmethod
    def requeue_expired(self) -> int:
        """Take back leases whose worker stopped heartbeating; returns how many."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished (raises InvalidTransition when it has)."""

    @abc.abstractmethod
    def prune(self, older_than_seconds: float) -> int:
        """Delete finished jobs older than this; returns how many."""

    # -- workers --------------------------------------------------------------------
    @abc.abstractmethod
    def register_worker(self, caps: Capabilities, worker_id: str | None = None) -> str:
        """Record (or refresh) a worker and return its id."""

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> WorkerRecord:
        """One worker (raises NotFound)."""

    @abc.abstractmethod
    def list_workers(self, *, alive_only: bool = False) -> list[WorkerRecord]:
        """Registered workers, newest contact first."""

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        """The worker stopped cleanly."""

    # -- tokens ---------------------------------------------------------------------
    @abc.abstractmethod
    def create_token(
        self, name: str, scope: Scope, *, secret: str | None = None
    ) -> tuple[TokenInfo, str]:
        """A new token; the secret is returned once and only its hash is kept.

        ``secret`` supplies the secret instead of a random one (a first admin token made
        elsewhere and handed in through a file).
        """

    @abc.abstractmethod
    def verify_token(self, secret: str) -> TokenInfo | None:
        """The token's record if the secret is valid and not revoked."""

    @abc.abstractmethod
    def list_tokens(self) -> list[TokenInfo]:
        """Every token, revoked ones included."""

    @abc.abstractmethod
    def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke a token at once (raises NotFound)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
