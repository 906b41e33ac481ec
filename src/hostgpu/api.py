"""The /v1 wire schema: request and response bodies shared by the gateway and the client.

The records themselves (``JobSpec``, ``Job``, ``Lease``, ``Outcome``, ``Capabilities``,
``WorkerInfo``, ``TokenInfo``) live with their domain modules; this module holds only the
envelopes around them. The gateway's OpenAPI schema is generated from these models, and the
client parses responses into them, so both ends always agree.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from hostgpu.capabilities import WorkerInfo
from hostgpu.inference.jobs import EngineState, StreamEvent
from hostgpu.jobs import Job, JobResult, JobSpec, Lease, Outcome, ReportResult
from hostgpu.requirements import NOT_BOOL
from hostgpu.stats import ThroughputBucket, WorkerLoad
from hostgpu.tokens import MAX_LIFETIME_S, MIN_LIFETIME_S, Scope, TokenInfo

MAX_BATCH = 5000
#: Job and worker ids are 32 hex digits; a unique prefix of 4 or more names one too.
ID_PATTERN = r"^[0-9a-f]{4,32}$"
#: A job id in full (where a prefix cannot be looked up).
FULL_ID_PATTERN = r"^[0-9a-f]{32}$"
WORKER_ID_PATTERN = r"^[0-9a-f]{32}$"
#: Jobs one lease asks for at most: a lease request, a channel's grant, a push.
MAX_LEASE = 1000
#: The longest long poll, in seconds (a client that waits longer asks again).
MAX_WAIT_S = 60
LEASE_TOKEN_PATTERN = r"^[0-9a-f]{1,64}$"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """Every error response: a sentence saying what is wrong and what to do."""

    detail: str
    errors: list[FieldError] | None = None


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": Problem, "description": text}
    for status, text in {
        400: "The request cannot be carried out",
        401: "Missing, invalid, expired or revoked token",
        403: "The token's scope does not allow this",
        404: "No such job, worker or token",
        409: "The object's state does not allow this",
        413: "The request body is over the limit",
        422: "The request does not match the schema, or widens a function's declared options",
    }.items()
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- jobs ---------------------------------------------------------------------------------------
class JobBatch(_Request):
    jobs: list[JobSpec] = Field(min_length=1, max_length=MAX_BATCH)


class JobIds(BaseModel):
    ids: list[str] = Field(description="the new (or, for a known idempotency key, existing) ids")


class WaitRequest(_Request):
    ids: list[Annotated[str, Field(pattern=FULL_ID_PATTERN)]] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="job ids, whole (404 when one names no job: it would never finish)",
    )
    timeout: Annotated[float, Field(ge=0, le=MAX_WAIT_S), NOT_BOOL] = Field(
        default=10.0, description="seconds to wait at most"
    )


class JobResults(BaseModel):
    results: list[JobResult]


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = Field(
        default=None, description="pass as `cursor` for the next (older) page; null: no more"
    )


class Summary(BaseModel):
    counts: dict[str, int]
    total: int


# -- workers ------------------------------------------------------------------------------------
class Registered(BaseModel):
    worker_id: str
    lease_seconds: float = Field(description="a lease lasts this long unless heartbeats extend it")
    heartbeat_seconds: float = Field(description="send a heartbeat at least this often")
    max_body_bytes: int | None = Field(
        default=None,
        description="a report (or channel message) larger than this is refused whole (413)",
    )
    max_result_bytes: int | None = Field(
        default=None,
        description="a result larger than this, as JSON, fails its job (ResultTooLarge)",
    )
    channel_revoke: bool = Field(
        default=False, description="the worker channel takes ChannelUp.revoke"
    )
    channel_streams: bool = Field(
        default=False, description="the worker channel takes ChannelUp.stream"
    )


class LeaseRequest(_Request):
    max_jobs: Annotated[int, Field(ge=1, le=MAX_LEASE), NOT_BOOL] = 1
    wait: Annotated[float, Field(ge=0, le=MAX_WAIT_S), NOT_BOOL] = Field(
        default=0.0, description="long-poll up to this many seconds"
    )


class LeaseResponse(BaseModel):
    leases: list[Lease]


class HeldLease(_Request):
    job_id: str = Field(pattern=ID_PATTERN)
    lease_token: str = Field(pattern=LEASE_TOKEN_PATTERN)


class HeartbeatRequest(_Request):
    leases: list[HeldLease] = Field(default_factory=list, max_length=10_000)


class HeartbeatResponse(BaseModel):
    lost: list[str] = Field(
        description="jobs this worker must stop: cancelled, or leased again after its lease lapsed"
    )
    lost_leases: list[HeldLease] = Field(
        default_factory=list,
        description="the same, as leases: a worker may hold an old and a new lease of one job",
    )


class ReportRequest(_Request):
    outcomes: list[Outcome] = Field(min_length=0, max_length=MAX_BATCH)
    lease: LeaseRequest | None = Field(
        default=None,
        description="lease more jobs in the same round trip, after the outcomes are recorded "
        "(its wait long-polls when nothing is runnable)",
    )


class ReportResponse(BaseModel):
    results: list[ReportResult]
    leases: list[Lease] = Field(default_factory=list, description="jobs leased by `lease`")


#: The most events one stream batch carries (a server that has more sends several).
MAX_STREAM_EVENTS = 10_000


class StreamBatch(_Request):
    """A model server's news: text of its running inference jobs, and its engines' state."""

    events: list[StreamEvent] = Field(default_factory=list, max_length=MAX_STREAM_EVENTS)
    engines: list[EngineState] | None = Field(
        default=None, max_length=64, description="set when an engine loaded, unloaded or changed"
    )


class StreamReply(BaseModel):
    cancelled: list[str] = Field(
        description="jobs whose client went away (or that were cancelled): stop generating"
    )


class ChannelUp(_Request):
    """A worker's message on its channel (``/v1/workers/{id}/channel``, a WebSocket).

    ``grant`` adds job slots the gateway may fill (leases it pushes use them up: credits, so a
    lease in flight is never counted twice); ``revoke`` takes back every slot granted and not
    used yet (before this message's ``grant`` adds any); ``outcomes``, with a ``seq`` the
    answer repeats, are recorded like ``POST …/report``; ``stream``, a model server's text and
    engine states, is relayed like ``POST …/streams`` (the jobs to stop come back in
    ``ChannelDown.cancelled``)."""

    seq: Annotated[int, Field(ge=0), NOT_BOOL] = 0
    outcomes: list[Outcome] = Field(default_factory=list, max_length=MAX_BATCH)
    grant: Annotated[int, Field(ge=0, le=MAX_LEASE), NOT_BOOL] = 0
    revoke: bool = False
    stream: StreamBatch | None = None


class ChannelDown(BaseModel):
    """The gateway's message on a worker channel: leased jobs, the results of the report
    numbered ``seq``, or the streaming jobs to stop."""

    leases: list[Lease] = Field(default_factory=list)
    seq: int | None = None
    results: list[ReportResult] = Field(default_factory=list)
    cancelled: list[str] = Field(
        default_factory=list,
        description="jobs whose client went away (or that were cancelled): stop generating",
    )


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


# -- tokens and housekeeping --------------------------------------------------------------------
class TokenRequest(_Request):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[\x20-\x7e]+$")
    scope: Scope
    expires_in_s: (
        Annotated[
            float,
            Field(ge=MIN_LIFETIME_S, le=MAX_LIFETIME_S, allow_inf_nan=False),
            NOT_BOOL,
        ]
        | None
    ) = Field(
        default=None,
        description="seconds until it stops working (1 s to 10 years); null: until revoked",
    )


class TokenCreated(TokenInfo):
    token: str = Field(description="The secret; shown once, only its hash is kept")


class TokenList(BaseModel):
    tokens: list[TokenInfo]


class PruneRequest(_Request):
    older_than_s: Annotated[float, Field(ge=0, le=100 * 365 * 86400), NOT_BOOL]


class Pruned(BaseModel):
    deleted: int


# -- figures (dashboard, /v1/stats) -----------------------------------------------------------
class QueuedFunction(BaseModel):
    """The queued jobs of one function under one requirement, and why they wait."""

    function: str
    queued: int
    delayed: int = Field(description="of them, waiting out a retry backoff")
    waiting: str | None = Field(
        description="why no worker takes them (the reason `hostgpu jobs` shows); null: a "
        "live worker fits, they run as soon as it has a free slot"
    )
    fix: str | None = Field(default=None, description="what to do about it, when not said above")


class QueueStat(BaseModel):
    """Queued jobs that need the same thing from a worker."""

    requirement: str = Field(description="e.g. mps, cuda:h100 ≥40 GB, cpu, any")
    gpu: str
    queued: int
    delayed: int
    oldest_wait_s: float | None = Field(
        description="how long the longest-waiting runnable job has waited; null: all delayed"
    )
    functions: list[QueuedFunction]


class QueueStats(BaseModel):
    queues: list[QueueStat]
    queued: int = Field(description="all queued jobs")
    at: float = Field(description="UNIX time of the figures")


class Throughput(BaseModel):
    """Jobs finished per bucket over a window, with their queue wait and run time."""

    since: float = Field(description="UNIX time the window starts")
    window_s: float
    bucket_s: float
    buckets: list[ThroughputBucket] = Field(description="oldest first; empty buckets left out")
    succeeded: int
    failed: int
    cancelled: int


class WorkerActivity(WorkerLoad):
    per_minute: float = Field(description="jobs finished per minute over the window")


class WorkerActivityList(BaseModel):
    window_s: float
    workers: list[WorkerActivity]
