"""Request and response bodies of the /v1 API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from hostgpu.capabilities import Capabilities
from hostgpu.jobs import Job, JobSpec, Lease, Outcome
from hostgpu.store.interface import Scope

MAX_BATCH = 5000


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
        401: "Missing, invalid or revoked token",
        403: "The token's scope does not allow this",
        404: "No such job, worker or token",
        409: "The object's state does not allow this",
        413: "The request body is over the limit",
        422: "The request does not match the schema",
    }.items()
}


class JobBatch(BaseModel):
    model_config = {"extra": "forbid"}
    jobs: list[JobSpec] = Field(min_length=1, max_length=MAX_BATCH)


class JobIds(BaseModel):
    ids: list[str]


class WaitRequest(BaseModel):
    model_config = {"extra": "forbid"}
    ids: list[str] = Field(min_length=1, max_length=MAX_BATCH)
    timeout: float = Field(default=10.0, ge=0, le=60)


class JobList(BaseModel):
    jobs: list[Job]


class Summary(BaseModel):
    counts: dict[str, int]
    total: int


class Registered(BaseModel):
    worker_id: str
    lease_seconds: float
    heartbeat_seconds: float


class LeaseRequest(BaseModel):
    model_config = {"extra": "forbid"}
    max_jobs: int = Field(default=1, ge=1, le=1000)
    wait: float = Field(default=0.0, ge=0, le=60)


class LeaseResponse(BaseModel):
    leases: list[Lease]


class HeldLease(BaseModel):
    job_id: str
    lease_token: str


class HeartbeatRequest(BaseModel):
    model_config = {"extra": "forbid"}
    leases: list[HeldLease] = Field(default_factory=list, max_length=10_000)


class HeartbeatResponse(BaseModel):
    lost: list[str]


class ReportRequest(BaseModel):
    model_config = {"extra": "forbid"}
    outcomes: list[Outcome] = Field(min_length=1, max_length=MAX_BATCH)


class ReportItem(BaseModel):
    job_id: str
    accepted: bool
    reason: str | None = None


class ReportResponse(BaseModel):
    results: list[ReportItem]


class WorkerInfo(BaseModel):
    id: str
    capabilities: Capabilities
    registered_at: float
    last_seen: float
    state: str
    alive: bool


class WorkerList(BaseModel):
    workers: list[WorkerInfo]


class TokenRequest(BaseModel):
    model_config = {"extra": "forbid"}
    name: str = Field(min_length=1, max_length=200)
    scope: Scope


class TokenOut(BaseModel):
    id: str
    name: str
    scope: str
    created_at: float
    revoked_at: float | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="The secret; shown once, only its hash is kept")


class TokenList(BaseModel):
    tokens: list[TokenOut]


class PruneRequest(BaseModel):
    model_config = {"extra": "forbid"}
    older_than_s: float = Field(ge=0)


class Pruned(BaseModel):
    deleted: int
