"""Read-only figures about the queue and the fleet, as the store aggregates them.

The dashboard, ``/metrics`` and the ``/v1/stats`` routes read these; none of them changes a
job. Each is one SQL aggregate over an indexed column (queued jobs: the queue's partial index;
finished jobs: ``finished_at``; active jobs: the active-lease partial index), so they stay
cheap with a long history.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from hostgpu.requirements import Requirements


class QueueGroup(BaseModel):
    """Queued jobs that share a function and a requirement."""

    function: str
    requirements: Requirements
    fallback: str | None = None
    resolved: bool = True
    queued: int = Field(description="jobs in the group")
    delayed: int = Field(default=0, description="of them, waiting out a retry backoff")
    oldest_created_at: float = Field(description="UNIX time the oldest job was submitted")
    oldest_runnable_at: float | None = Field(
        default=None,
        description="UNIX time since which the longest-waiting runnable job could have run; "
        "null when every job in the group waits out a backoff",
    )


class ThroughputBucket(BaseModel):
    """Jobs that finished in one time bucket ``[start, start + bucket_s)``."""

    start: float = Field(description="UNIX time the bucket starts")
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    wait_avg_s: float | None = Field(
        default=None, description="mean queue wait (runnable → leased) of the jobs that ran"
    )
    wait_max_s: float | None = None
    run_avg_s: float | None = Field(default=None, description="mean lease-to-finish time")


class WorkerLoad(BaseModel):
    """What one worker is doing now and has done lately."""

    worker_id: str
    running: int = Field(default=0, description="jobs leased to it or running on it now")
    succeeded: int = Field(default=0, description="jobs it finished in the window")
    failed: int = 0


class JobFacts(BaseModel):
    """The few columns metrics need about a job that just moved (no payload, no result)."""

    id: str
    function: str
    requirement: str = Field(description="the gpu requirement, e.g. mps, cuda:h100, any")
    state: str
    device: str | None = None
    worker_id: str | None = None
    fallback_used: bool = False
    run_after: float = Field(description="UNIX time the job last became runnable")
    leased_at: float | None = Field(default=None, description="its latest attempt's lease time")
    finished_at: float | None = None


class ExpiredLease(BaseModel):
    """A lease the store took back because its worker stopped heartbeating."""

    job_id: str
    function: str
    requirement: str
    worker_id: str | None = None
    gave_up: bool = Field(description="true: the job lost too many leases and failed for good")
