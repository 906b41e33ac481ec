"""The store interface, at the level of domain verbs.

Core code (gateway, CLI) talks only to this; it never sees a database driver.
Implementations: :mod:`hostgpu.store.sqlite` and :mod:`hostgpu.store.postgres`,
both built on the shared SQLAlchemy Core code in :mod:`hostgpu.store.sql`.

The store persists; it does not decide. Which state a job moves to is the state machine in
:mod:`hostgpu.jobs`; when a failed job runs again is :class:`hostgpu.retry.RetryPolicy`
(given to the store when it is opened); a job's effective options come from
:func:`hostgpu.functions.resolve`; token secrets from :mod:`hostgpu.tokens`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from hostgpu.capabilities import Capabilities, WorkerInfo
from hostgpu.functions import FunctionOptions, Requested, Resolved
from hostgpu.jobs import (
    Job,
    JobError,
    JobResult,
    JobState,
    Lease,
    Outcome,
    Payload,
    ReportResult,
)
from hostgpu.stats import ExpiredLease, JobFacts, QueueGroup, ThroughputBucket, WorkerLoad
from hostgpu.tokens import TokenInfo

#: The most one :meth:`Store.broadcast` payload may hold (PostgreSQL's NOTIFY takes 8000 bytes,
#: the sender's id and the topic included).
MAX_BROADCAST_BYTES = 7000


@dataclass(frozen=True)
class NewJob:
    """A job ready to be stored: its call, and its options as far as they are known.

    ``resolved`` is False when no worker has published the function's declaration yet: the
    options are then the submission's (defaults elsewhere), and the job is not leased until
    a declaration arrives and :meth:`Store.resolve` settles them.
    """

    function: str
    payload: Payload | str | None
    options: Resolved
    requested: Requested
    resolved: bool
    idempotency_key: str | None = None
    #: Digests of the blobs the job needs (uploaded beforehand).
    inputs: tuple[str, ...] = ()


@dataclass(frozen=True)
class BlobInfo:
    """A blob's digest (SHA-256, hex), size in bytes and arrival time (UNIX)."""

    digest: str
    size: int
    created_at: float


@dataclass(frozen=True)
class Pending:
    """A job whose options wait for its function's declaration."""

    job_id: str
    function: str
    requested: Requested


@dataclass(frozen=True)
class JobFilter:
    """Which jobs to list (every field optional)."""

    state: JobState | None = None
    function: str | None = None
    worker_id: str | None = None
    device: str | None = None
    id_prefix: str | None = None


@dataclass(frozen=True)
class HeartbeatResult:
    #: (job id, lease token) of the leases the worker must stop: cancelled, finished, or the
    #: job leased again after this lease lapsed.
    lost: list[tuple[str, str]]


class Store(abc.ABC):
    """Durable jobs, workers, published functions and tokens."""

    #: Whether several gateways may share this store (and hear each other's events).
    shared: bool = False
    #: Transactions run by this process, by kind ("read", "write"): what an idle fleet costs.
    transactions: dict[str, int]

    # -- jobs -----------------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(self, jobs: Sequence[NewJob]) -> list[Job]:
        """Add jobs; one whose idempotency key exists returns the existing job."""

    @abc.abstractmethod
    def get(self, job_id: str, *, history: bool = False) -> Job:
        """One job by id or unique id prefix (NotFound, AmbiguousId)."""

    @abc.abstractmethod
    def get_many(self, job_ids: Sequence[str], *, terminal_only: bool = False) -> list[Job]:
        """The jobs among ``job_ids`` that exist (optionally only finished ones)."""

    @abc.abstractmethod
    def unknown(self, job_ids: Sequence[str]) -> list[str]:
        """Those of ``job_ids`` that name no job, in their order."""

    @abc.abstractmethod
    def results(self, job_ids: Sequence[str]) -> list[JobResult]:
        """The results (or errors) of the finished jobs among ``job_ids``; a light read that
        leaves out the call, the options and the times."""

    @abc.abstractmethod
    def list_jobs(
        self, where: JobFilter | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Newest first, and the cursor of the next page (None at the end)."""

    @abc.abstractmethod
    def count_by_state(self) -> dict[str, int]:
        """How many jobs are in each state."""

    @abc.abstractmethod
    def lease(
        self,
        worker_id: str,
        caps: Capabilities,
        *,
        max_jobs: int,
        lease_seconds: float,
        probe: bool = True,
        touch_older_than: float | None = None,
    ) -> list[Lease]:
        """Hand up to ``max_jobs`` runnable jobs that ``caps`` satisfies to the worker
        (``probe``: look before taking the write lock, as most polls find nothing).

        ``touch_older_than``: also mark the worker alive when its last contact is older than
        that many seconds, in the same transaction (which then takes the write lock and skips
        the probe); raises NotFound for a worker that is not registered."""

    @abc.abstractmethod
    def heartbeat(
        self, worker_id: str, leases: Sequence[tuple[str, str]], *, lease_seconds: float
    ) -> HeartbeatResult:
        """Mark the worker alive and extend the leases it still holds."""

    @abc.abstractmethod
    def report(self, outcomes: Sequence[Outcome]) -> list[ReportResult]:
        """Record started / succeeded / failed / released outcomes, fenced by lease token."""

    @abc.abstractmethod
    def requeue_expired(self) -> int:
        """Take back leases whose worker stopped heartbeating; returns how many."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> Job:
        """Cancel a job that has not finished (raises InvalidTransition when it has)."""

    @abc.abstractmethod
    def rerun(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, with fresh retry and lost-lease counts."""

    @abc.abstractmethod
    def prune(self, older_than_seconds: float) -> int:
        """Delete finished jobs older than this, and blobs older than this that no remaining
        job needs; returns how many jobs."""

    @abc.abstractmethod
    def requeue(self, job_id: str, *, delay_s: float = 0.0) -> Job:
        """Take a leased or running job back from its worker and queue it again (an admin's
        verb for a stuck worker), runnable after ``delay_s``. The attempt is recorded as
        ``requeued`` and counts against neither retries nor lost leases; the worker learns at
        its next heartbeat and stops the job. InvalidTransition when the job is not leased
        or running."""

    @abc.abstractmethod
    def expire_leases(self) -> list[ExpiredLease]:
        """:meth:`requeue_expired`, saying which jobs it took back (for metrics)."""

    # -- figures (read-only) ------------------------------------------------------------
    @abc.abstractmethod
    def queue_groups(self) -> list[QueueGroup]:
        """Queued jobs grouped by function and requirement: counts and oldest times."""

    @abc.abstractmethod
    def throughput(self, since: float, bucket_s: float) -> list[ThroughputBucket]:
        """Jobs finished since ``since`` (UNIX time) by bucket of ``bucket_s`` seconds,
        oldest first; buckets where nothing finished are left out."""

    @abc.abstractmethod
    def worker_load(self, since: float) -> list[WorkerLoad]:
        """Per worker: jobs active on it now, and jobs it finished since ``since``."""

    @abc.abstractmethod
    def job_facts(self, job_ids: Sequence[str]) -> list[JobFacts]:
        """Light records of the jobs among ``job_ids`` that exist (no payload or result)."""

    # -- blobs --------------------------------------------------------------------------
    @abc.abstractmethod
    def put_blob(self, digest: str, source: BinaryIO) -> BlobInfo:
        """Keep the bytes of ``source`` (read to its end) as blob ``digest``; InvalidInput
        when they do not hash to it. Storing a blob that exists is a no-op."""

    @abc.abstractmethod
    def blob_info(self, digest: str) -> BlobInfo | None:
        """The blob's record, or None."""

    @abc.abstractmethod
    def read_blob(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks (NotFound)."""

    # -- published functions ----------------------------------------------------------
    @abc.abstractmethod
    def declarations(self, functions: Sequence[str]) -> dict[str, FunctionOptions]:
        """The declared options of those of ``functions`` that some worker published."""

    @abc.abstractmethod
    def pending(self, *, limit: int = 1000) -> list[Pending]:
        """Jobs whose options still wait for a declaration, oldest first."""

    @abc.abstractmethod
    def resolve(self, settled: Sequence[tuple[str, Resolved | JobError]]) -> int:
        """Settle pending jobs: their effective options, or a rejection (the job fails)."""

    # -- workers --------------------------------------------------------------------
    @abc.abstractmethod
    def register_worker(self, caps: Capabilities, worker_id: str | None = None) -> str:
        """Record (or refresh) a worker and the functions it publishes; return its id."""

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> WorkerInfo:
        """One worker (raises NotFound)."""

    @abc.abstractmethod
    def list_workers(self, *, alive_only: bool = False) -> list[WorkerInfo]:
        """Registered workers, newest contact first."""

    @abc.abstractmethod
    def drain_worker(self, worker_id: str) -> None:
        """The worker is stopping: lease it nothing more (its heartbeats keep it alive)."""

    @abc.abstractmethod
    def deregister_worker(self, worker_id: str) -> None:
        """The worker stopped cleanly."""

    # -- events ---------------------------------------------------------------------
    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(topic)`` (from another thread) when another store on the same
        database reports ``runnable`` (after an enqueue of a few kinds of job,
        ``runnable:<JSON [[function, requirements, fallback, count], …]>``), ``finished``,
        ``tokens``, ``drain:<worker>``, ``worker:<worker>`` (registered again, perhaps with
        other capabilities) or ``resync``; returns a function that stops
        listening. None by default: one gateway per database (SQLite) hears everything in
        process."""
        return lambda: None

    def broadcast(self, topic: str, payloads: Sequence[str]) -> None:
        """Tell the other gateways on this database ``topic:payload`` for each payload (each
        at most :data:`MAX_BROADCAST_BYTES` of UTF-8), in order; their :meth:`subscribe`
        callbacks hear it. Not durable, nor all-or-nothing: a gateway that dies meanwhile
        may have sent only the first ones. Nothing by default: no other gateway can exist."""
        return None

    # -- tokens ---------------------------------------------------------------------
    @abc.abstractmethod
    def add_token(self, info: TokenInfo, token_hash: str) -> None:
        """Keep a token minted by :func:`hostgpu.tokens.mint` (its hash, never the secret)."""

    @abc.abstractmethod
    def verify_token(self, token_hash: str) -> TokenInfo | None:
        """The token's record if it exists, is not revoked and has not expired."""

    @abc.abstractmethod
    def list_tokens(self) -> list[TokenInfo]:
        """Every token, revoked ones included."""

    @abc.abstractmethod
    def revoke_token(self, token_id: str, *, force: bool = False) -> TokenInfo:
        """Revoke a token, by id or unique id prefix, at once (NotFound, AmbiguousId).
        Refuses the last active admin token (LastAdminToken) unless ``force``."""

    @abc.abstractmethod
    def has_active_admin(self) -> bool:
        """Whether some admin token is neither revoked nor expired."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""

    def health(self) -> Any:
        """A cheap round trip to the database (for /healthz)."""
        return self.count_by_state()
