"""The job model: one record per stage of a job, and the state machine they move through.

    JobSpec ──submit──▶ Job ──lease──▶ Lease ──run──▶ Outcome ──report──▶ ReportResult
    (client)            (store)        (worker)       (worker)            (store's answer)

A job's states and the events that move it between them are written down once, in
:data:`TRANSITIONS`; the stores derive their ``WHERE state IN (…)`` fences from it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hostgpu.capabilities import Device
from hostgpu.jsontext import lone_escape
from hostgpu.requirements import (
    DIGEST_PATTERN,
    FUNCTION_PATTERN,
    FUNCTION_RE,
    GPU_PATTERN,
    NOT_BOOL,
    SAFE_TEXT,
    LabelKey,
    LabelValue,
    Requirements,
    closed_keys,
    normalise_gpu,
)


def check_finite(value: Any, where: str = "payload") -> Any:
    """Refuse NaN and ±Infinity anywhere in a JSON value (JSON has no such numbers)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where} contains {item!r}, which is not a JSON number")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return value


# -- states -----------------------------------------------------------------------------------
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


class Event(enum.StrEnum):
    """What happens to a job."""

    lease = "lease"  # a worker takes it
    start = "start"  # its worker says it is running
    succeed = "succeed"
    fail = "fail"  # failed for good (no retries left, or not retryable)
    retry = "retry"  # failed, will run again after a backoff
    release = "release"  # handed back unstarted or by a cold stop: the attempt does not count
    lose = "lose"  # its worker stopped heartbeating and the lease expired
    give_up = "give_up"  # lost too many leases
    cancel = "cancel"
    reject = "reject"  # never runnable: not a published function, or options conflict
    rerun = "rerun"  # an admin runs a finished job again
    requeue = "requeue"  # an admin takes a leased or running job back from its worker


QUEUED, LEASED, RUNNING = JobState.queued, JobState.leased, JobState.running
SUCCEEDED, FAILED, CANCELLED = JobState.succeeded, JobState.failed, JobState.cancelled

#: event → (states it may happen in, state it leads to)
TRANSITIONS: dict[Event, tuple[frozenset[JobState], JobState]] = {
    Event.lease: (frozenset({QUEUED}), LEASED),
    Event.start: (frozenset({LEASED, RUNNING}), RUNNING),  # idempotent: repeats are harmless
    Event.succeed: (frozenset({LEASED, RUNNING}), SUCCEEDED),
    Event.fail: (frozenset({LEASED, RUNNING}), FAILED),
    Event.retry: (frozenset({LEASED, RUNNING}), QUEUED),
    Event.release: (frozenset({LEASED, RUNNING}), QUEUED),
    Event.lose: (frozenset({LEASED, RUNNING}), QUEUED),
    Event.give_up: (frozenset({LEASED, RUNNING}), FAILED),
    Event.cancel: (frozenset({QUEUED, LEASED, RUNNING}), CANCELLED),
    Event.reject: (frozenset({QUEUED}), FAILED),
    Event.rerun: (frozenset({FAILED, CANCELLED}), QUEUED),
    Event.requeue: (frozenset({LEASED, RUNNING}), QUEUED),
}


def sources(event: Event) -> list[str]:
    """The states ``event`` may happen in, as stored strings (sorted, for stable SQL)."""
    return sorted(state.value for state in TRANSITIONS[event][0])


def target(event: Event) -> str:
    return TRANSITIONS[event][1].value


def next_state(state: JobState, event: Event) -> JobState:
    """Where ``event`` takes a job in ``state``; ValueError when it cannot happen there."""
    allowed, to = TRANSITIONS[event]
    if state not in allowed:
        raise ValueError(f"a {state.value} job cannot {event.value}")
    return to


# -- requirements and errors --------------------------------------------------------------
ErrorKind = Literal[
    "exception",  # the function raised
    "import",  # its module would not import
    "forbidden",  # not a published function
    "serialization",  # arguments or result would not (de)serialise
    "timeout",
    "crash",  # the child process died
    "cancelled",
    "lost",  # the worker stopped heartbeating
    "conflict",  # the submission's options conflict with the declaration
    "limit",  # over a size limit
    "input",  # an input blob could not be fetched
]


#: Error texts past these lengths (characters) are cut where the error is made, so that a job
#: that raises with a 20 MB message still fails readably, in a report the gateway takes (and
#: lone surrogates in them are escaped, for the same reason).
MAX_ERROR_MESSAGE = 64 * 1024
MAX_TRACEBACK = 256 * 1024


def as_text(text: str) -> str:
    """``text`` with any lone surrogate written as its escape (``\\udcff``): an exception
    about an undecodable file name carries one, and it is not text anywhere else."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def readable_json(value: str) -> str:
    """Stored JSON text, with any lone surrogate in its strings written as its escape text
    (:func:`as_text`). The gateway refuses them now (``jsontext.lone_surrogate``), but a
    row stored before it did (a payload, a result, labels, a worker's capabilities) would
    fail every response that shows it: a listing answered 500 for one such job. Parsed only
    when a lone surrogate escape is there (an escaped backslash before a pair's ``\\u`` can
    look like one: rewriting it changes nothing)."""
    if ("\\ud" not in value and "\\uD" not in value) or not lone_escape(value):
        return value
    return json.dumps(_text_only(json.loads(value)), separators=(",", ":"))


def _text_only(value: Any) -> Any:
    if isinstance(value, str):
        return as_text(value)
    if isinstance(value, list):
        return [_text_only(item) for item in value]
    if isinstance(value, dict):
        return {as_text(key): _text_only(item) for key, item in value.items()}
    return value


def clip(text: str, limit: int, *, keep: Literal["head", "tail"] = "head") -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    note = f"[… {len(text) - limit:,} characters cut …]"
    kept = limit - len(note) - 1
    if kept <= 0:
        return note[:limit]
    return f"{text[:kept]}\n{note}" if keep == "head" else f"{note}\n{text[-kept:]}"


class JobError(BaseModel):
    """Why an attempt or a job failed (texts cut to :data:`MAX_ERROR_MESSAGE` and
    :data:`MAX_TRACEBACK` characters)."""

    type: str = Field(description="exception class name, e.g. ValueError, TimeoutError")
    message: str
    traceback: str = ""
    kind: ErrorKind = "exception"

    @field_validator("type", "message")
    @classmethod
    def _clip_message(cls, value: str) -> str:
        return as_text(clip(value, MAX_ERROR_MESSAGE))

    @field_validator("traceback")
    @classmethod
    def _clip_traceback(cls, value: str) -> str:
        # A traceback's end says what was raised, and where: keep that.
        return as_text(clip(value, MAX_TRACEBACK, keep="tail"))

    def summary(self, limit: int = 2000) -> str:
        return f"{self.type}: {self.message}"[:limit]


#: The gateway's default limit on one result (``HOSTGPU_MAX_RESULT_BYTES``).
DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024


def digest_key(prefix: str, *parts: object) -> str:
    """An idempotency key made of ``prefix`` and a digest of ``parts`` (a file's path, size,
    time): within the printable ASCII keys allow, whatever the parts hold (a long path, one
    that is not ASCII or not even UTF-8), and no two collide by being cut short."""
    text = "\0".join(str(part) for part in parts).encode("utf-8", "surrogateescape")
    return f"{prefix}:{hashlib.sha256(text).hexdigest()}"


def result_too_large(size: int, limit: int) -> JobError:
    """The failure of a job whose result (``size`` bytes of JSON) is over the gateway's
    limit: said the same by the worker, which checks before reporting, and by the gateway."""
    return JobError(
        type="ResultTooLarge",
        message=f"the result is {size} bytes, over the gateway's limit of {limit} "
        "(HOSTGPU_MAX_RESULT_BYTES); return a path or a URL",
        kind="limit",
    )


# -- what a client submits ------------------------------------------------------------------------
class Payload(BaseModel):
    """The JSON arguments of a call: ``f(*args, **kwargs)``."""

    model_config = ConfigDict(extra="forbid")

    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class JobSpec(BaseModel):
    """What a client submits. Unset options take the function's declared ones; a set option may
    narrow the declaration, never widen it (422 when it would)."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(
        max_length=300,
        description="module:qualname of a function published with @hostgpu.function",
        json_schema_extra={"pattern": FUNCTION_PATTERN},
    )
    payload: Payload | str | None = Field(
        default=None,
        description='JSON serializer: {"args": [...], "kwargs": {...}} (or null for no '
        "arguments); pickle serializer: base64 of pickle.dumps((args, kwargs))",
    )
    serializer: Literal["json", "pickle"] | None = None
    gpu: str | None = Field(
        default=None,
        description="narrow the declared device: mps | cuda | cuda:<name> | mlx | gpu | cpu | any",
        json_schema_extra={"pattern": GPU_PATTERN},
    )
    min_memory_gb: Annotated[float, Field(ge=0, le=100_000), NOT_BOOL] | None = None
    labels: dict[LabelKey, LabelValue] | None = Field(
        default=None, max_length=16, json_schema_extra=closed_keys
    )
    fallback: Literal["cpu", "none"] | None = Field(
        default=None, description='"cpu" only when the function declares it; "none" drops it'
    )
    priority: Annotated[int, Field(ge=-1000, le=1000), NOT_BOOL] | None = None
    timeout_s: Annotated[float, Field(gt=0, le=7 * 24 * 3600), NOT_BOOL] | None = None
    max_retries: Annotated[int, Field(ge=0, le=100), NOT_BOOL] | None = None
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, json_schema_extra={"pattern": SAFE_TEXT}
    )
    inputs: list[Annotated[str, Field(pattern=DIGEST_PATTERN)]] | None = Field(
        default=None,
        max_length=64,
        description="SHA-256 digests of blobs uploaded with PUT /v1/blobs/{digest}: the worker "
        "fetches them before it runs the job (hostgpu.context.input_path(digest))",
    )

    @field_validator("function")
    @classmethod
    def _check_function(cls, value: str) -> str:
        if not FUNCTION_RE.fullmatch(value):
            raise ValueError("function must look like 'package.module:function'")
        return value

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str | None) -> str | None:
        return None if value is None else normalise_gpu(value)

    @field_validator("payload")
    @classmethod
    def _check_payload(cls, value: Payload | str | None) -> Payload | str | None:
        if isinstance(value, Payload):
            check_finite(value.args, "payload.args")
            check_finite(value.kwargs, "payload.kwargs")
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _check_key(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(SAFE_TEXT, value):
            raise ValueError("idempotency_key must be printable ASCII")
        return value

    @property
    def module(self) -> str:
        return self.function.partition(":")[0]


# -- what the store keeps -------------------------------------------------------------------------
class Attempt(BaseModel):
    attempt: int
    worker_id: str | None = None
    device: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: str | None = Field(
        default=None,
        description="succeeded | failed | retry | lost | requeued | released; null: running",
    )
    error: str | None = None


class Job(BaseModel):
    """A job as the store keeps it."""

    id: str
    function: str
    payload: Payload | str | None = None
    serializer: Literal["json", "pickle"] = "json"
    requirements: Requirements
    fallback: Literal["cpu"] | None = None
    priority: int = 0
    timeout_s: float = 600.0
    max_retries: int = 2
    idempotency_key: str | None = None
    resolved: bool = Field(
        default=True,
        description="false until a worker has published the function's declared options",
    )
    state: JobState
    attempts: int = Field(default=0, description="leases taken (the attempt number)")
    failures: int = Field(default=0, description="attempts that failed (counted by retries)")
    lost: int = Field(default=0, description="leases lost because a worker died")
    worker_id: str | None = None
    device: str | None = None
    fallback_used: bool = False
    result: Any = None
    error: JobError | None = None
    timings: dict[str, float] | None = None
    created_at: datetime
    updated_at: datetime
    run_after: datetime
    finished_at: datetime | None = None
    waiting: str | None = Field(default=None, description="why a queued job is not running")
    history: list[Attempt] | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


class JobResult(BaseModel):
    """What a finished job gave, and no more: its result or error (``POST /v1/jobs/results``,
    which ``.map()`` waits on; a :class:`Job` also carries its call, options and times)."""

    id: str
    function: str
    state: JobState
    attempts: int
    result: Any = None
    error: JobError | None = None


# -- what a worker gets and gives back ------------------------------------------------------------
class Lease(BaseModel):
    """A job handed to a worker, with the token that fences its completion."""

    job_id: str
    lease_token: str
    attempt: int
    function: str
    payload: Payload | str | None = None
    serializer: Literal["json", "pickle"] = "json"
    timeout_s: float
    device: Device = Field(description="the device of the worker this job must run on")
    fallback_used: bool = False
    lease_expires_at: datetime
    inputs: list[str] = Field(
        default_factory=list, description="digests of the blobs to fetch before running it"
    )


OutcomeStatus = Literal["succeeded", "failed", "started", "released"]


class Outcome(BaseModel):
    """What a worker reports for one leased job: started, finished, or handed back."""

    #: A job id as the gateway made it: anything else names no job (and, echoed in the
    #: reply, would be an id no other operation takes).
    job_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    lease_token: str = Field(max_length=64, json_schema_extra={"pattern": SAFE_TEXT})
    status: OutcomeStatus
    result: Any = None
    error: JobError | None = None
    retryable: bool = Field(default=True, description="whether a failure may be retried")
    device: str | None = Field(default=None, max_length=100)
    timings: dict[str, Annotated[float, NOT_BOOL]] | None = None

    @field_validator("result")
    @classmethod
    def _check_result(cls, value: Any) -> Any:
        return check_finite(value, "result")


class ReportResult(BaseModel):
    """What became of one reported outcome."""

    job_id: str
    accepted: bool
    reason: str | None = None
    retry_in_s: float | None = Field(
        default=None, description="a failure that will run again: after this many seconds"
    )
