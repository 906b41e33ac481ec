"""The job model: states, requirements, what a client submits and what the store keeps."""

from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from hostgpu.capabilities import Device

#: A job's function: "package.module:qualname", or a built-in pipeline name.
FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
# ASCII classes only: the same pattern is published in the OpenAPI schema, and Python's and
# JSON Schema's ideas of \S (and of `$` before a newline) differ.
GPU_PATTERN = r"^(mps|cuda|gpu|cpu|any|mlx|cuda:[A-Za-z0-9_. ()-]{1,100})$"
FUNCTION_RE = re.compile(FUNCTION_PATTERN)
GPU_RE = re.compile(GPU_PATTERN)


class JobState(enum.StrEnum):
    queued = "queued"
    leased = "leased"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})
ACTIVE_STATES = frozenset({JobState.leased, JobState.running})


class Requirements(BaseModel):
    """What a job needs from the worker that runs it."""

    gpu: str = Field(
        default="any",
        description="mps | cuda | cuda:<name substring> | gpu (any accelerator) | cpu | any",
        json_schema_extra={"pattern": GPU_PATTERN},
    )
    min_memory_gb: float | None = Field(default=None, ge=0, le=100_000)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str) -> str:
        if not GPU_RE.fullmatch(value):
            raise ValueError(
                f"gpu must be one of mps, cuda, cuda:<name>, gpu, cpu, any (got {value!r})"
            )
        kind, _, name = value.partition(":")
        return f"{kind.lower()}:{name.lower()}" if name else kind.lower()

    @property
    def kind(self) -> str:
        return self.gpu.partition(":")[0]

    @property
    def name(self) -> str | None:
        return self.gpu.partition(":")[2] or None

    def describe(self) -> str:
        parts = [self.gpu]
        if self.min_memory_gb:
            parts.append(f"≥{self.min_memory_gb:g} GB")
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return " ".join(parts)


class JobSpec(BaseModel):
    """What a client submits."""

    model_config = {"extra": "forbid"}

    function: str = Field(
        max_length=300,
        description="module:qualname of the function",
        json_schema_extra={"pattern": FUNCTION_PATTERN},
    )
    payload: Any = Field(default=None, description="JSON payload (args/kwargs envelope)")
    serializer: Literal["json", "pickle"] = "json"
    requirements: Requirements = Field(default_factory=Requirements)
    fallback: Literal["cpu"] | None = None
    priority: int = Field(default=0, ge=-1000, le=1000)
    timeout_s: float = Field(default=600.0, gt=0, le=7 * 24 * 3600)
    max_retries: int = Field(default=2, ge=0, le=100)
    idempotency_key: str | None = Field(default=None, max_length=200)

    @field_validator("function")
    @classmethod
    def _check_function(cls, value: str) -> str:
        if not FUNCTION_RE.fullmatch(value):
            raise ValueError("function must look like 'package.module:function'")
        return value

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]


class Attempt(BaseModel):
    attempt: int
    worker_id: str | None = None
    device: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    error: str | None = None


class Job(BaseModel):
    """A job as the store keeps it."""

    id: str
    function: str
    payload: Any = None
    serializer: str = "json"
    requirements: Requirements
    fallback: str | None = None
    priority: int = 0
    timeout_s: float = 600.0
    max_retries: int = 2
    idempotency_key: str | None = None
    state: JobState
    attempts: int = 0
    worker_id: str | None = None
    device: str | None = None
    fallback_used: bool = False
    result: Any = None
    error: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    created_at: datetime
    updated_at: datetime
    run_after: datetime
    finished_at: datetime | None = None
    waiting: str | None = None
    history: list[Attempt] | None = None


class Lease(BaseModel):
    """A job handed to a worker, with the token that fences its completion."""

    job_id: str
    lease_token: str
    attempt: int
    function: str
    payload: Any
    serializer: str
    timeout_s: float
    device: Device
    fallback_used: bool = False
    lease_expires_at: datetime


class Outcome(BaseModel):
    """What a worker reports for one leased job."""

    job_id: str
    lease_token: str
    status: Literal["succeeded", "failed", "started", "released"]
    result: Any = None
    error: dict[str, Any] | None = None
    retryable: bool = True
    device: str | None = None
    timings: dict[str, float] | None = None
