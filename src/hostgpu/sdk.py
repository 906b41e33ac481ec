"""The SDK: ``@hostgpu.function`` and what it returns.

@hostgpu.function(gpu="mps", timeout=60)
def embed(texts: list[str]) -> list[list[float]]: ...

embed(["hi"])                 # runs here, now
embed.remote(["hi"])          # runs on a worker with mps, returns the result
handle = embed.spawn(["hi"])  # returns at once; handle.result(timeout=…)
embed.map(batches)            # many jobs, results in order, with a progress bar

Where ``.remote()`` runs is the connected backend: a hostgpu gateway (default) or a Ray
cluster (``hostgpu.connect("ray://HOST:10001")``). Decorating a function also publishes it:
a worker that imports its module may run it, and only such functions.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypedDict,
    TypeVar,
    Unpack,
    overload,
)

from hostgpu.errors import GatewayUnavailable, JobCancelled, JobFailed, JobTimeout
from hostgpu.functions import FunctionOptions, import_path, publish
from hostgpu.jobs import Job, JobResult, JobSpec, JobState, Payload

if TYPE_CHECKING:
    from hostgpu.client import Client

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)
log = logging.getLogger("hostgpu")

#: A queued job that is not leased after this long says why it waits.
WAITING_NOTICE_S = 1.0
#: How long a caller waiting on jobs keeps asking a gateway it cannot reach: a restart. The
#: jobs are in its store, and it answers for them again once it is back.
RECONNECT_S = 60.0
#: ``.remote()`` submits and waits in one request for this long; a job not finished by then
#: is waited for as a handle, which says why it waits.
CALL_WAIT_S = WAITING_NOTICE_S


class Handle(Protocol[R_co]):
    """A submitted call, whatever the backend."""

    id: str

    def result(self, timeout: float | None = None) -> R_co: ...

    def status(self) -> str: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """Where ``.remote()``, ``.spawn()`` and ``.map()`` send work."""

    def spawn(
        self, fn: Function[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Handle[R]: ...

    def map(
        self, fn: Function[..., R], items: Sequence[tuple[Any, ...]], options: MapOptions
    ) -> list[Any]: ...

    def close(self) -> None: ...


_backend_lock = threading.Lock()
_backend: Backend | None = None


def connect(gateway: str | None = None, token: str | None = None) -> Backend:
    """Point the SDK at a backend: a gateway URL (default: HOSTGPU_GATEWAY, or the gateway
    `hostgpu up` started), or ``ray://HOST:PORT`` / ``ray`` for a Ray cluster."""
    global _backend
    with _backend_lock:
        if _backend is not None:
            _backend.close()
        _backend = _open_backend(gateway, token)
        return _backend


def _open_backend(address: str | None, token: str | None) -> Backend:
    if address is None:
        from hostgpu.settings import get_settings

        address = get_settings().gateway
    if address and (address == "ray" or address.startswith("ray://")):
        from hostgpu.ray.backend import RayBackend

        return RayBackend(address)
    from hostgpu.client import Client

    return GatewayBackend(Client(address, token))


def default_backend() -> Backend:
    global _backend
    with _backend_lock:
        if _backend is None:
            _backend = _open_backend(None, None)
        return _backend


def encode_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str
) -> Payload | str:
    if serializer == "pickle":
        return base64.b64encode(pickle.dumps((args, kwargs))).decode()
    try:
        json.dumps([args, kwargs], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"arguments must be JSON values ({exc}); pass plain data, or declare the function "
            "with serializer='pickle' (only between parties that trust each other)"
        ) from exc
    return Payload(args=list(args), kwargs=kwargs)


def decode_result(value: Any, serializer: str) -> Any:
    if serializer == "pickle" and isinstance(value, str):
        return pickle.loads(base64.b64decode(value))
    return value


def raise_for(job: Job | JobResult) -> None:
    """Raise JobFailed (with the remote traceback) or JobCancelled for a finished job."""
    if job.state is JobState.failed:
        error = job.error
        raise JobFailed(
            f"job {job.id} ({job.function}) failed after {job.attempts} attempt(s): "
            + (error.summary() if error else "no error recorded"),
            job_id=job.id,
            error_type=error.type if error else None,
            remote_traceback=error.traceback if error else None,
        )
    if job.state is JobState.cancelled:
        raise JobCancelled(f"job {job.id} was cancelled", job_id=job.id)


@dataclass(frozen=True)
class MapOptions:
    """How ``.map()`` runs, on every backend."""

    batch_size: int = 500  # calls per submission
    progress: bool = True  # draw the bars
    return_exceptions: bool = False  # a failed call's exception in its place, not raised
    timeout: float | None = None  # seconds for all of them

    def deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def chunks(self, items: Sequence[T]) -> Iterator[tuple[int, Sequence[T]]]:
        """(index of the first, the items) per submission."""
        for start in range(0, len(items), self.batch_size):
            yield start, items[start : start + self.batch_size]


@contextmanager
def map_progress(name: str, total: int, *, enabled: bool) -> Iterator[tuple[Any, Any, Any]]:
    """``.map()``'s two bars, on every backend: the bar, its "submit" task and its "run" task."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not enabled, transient=False) as bar:
        yield (
            bar,
            bar.add_task(f"submit {name}", total=total),
            bar.add_task(f"run {name}", total=total),
        )


class WaitingNotice:
    """Says once, early, why a job is not running yet, then keeps one status line current.

    A library must not spam a terminal: the reason goes to the ``hostgpu`` logger once, and a
    single transient line is updated on stderr when it is a terminal.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.said: str | None = None
        self._status: Any = None

    def update(self, job: Job) -> None:
        reason = job.waiting if job.state is JobState.queued else None
        if not reason or time.monotonic() - self.started < WAITING_NOTICE_S:
            return
        if reason != self.said:
            log.warning("%s: %s", self.label, reason)
            self.said = reason
        if sys.stderr.isatty():
            if self._status is None:
                from rich.console import Console

                self._status = Console(stderr=True).status(f"{self.label}: {reason}")
                self._status.start()
            else:
                self._status.update(f"{self.label}: {reason}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


class JobHandle(Generic[R]):
    """A job submitted to a gateway."""

    def __init__(self, job_id: str, serializer: str, client: Client) -> None:
        self.id = job_id
        self._serializer = serializer
        self._client = client

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def job(self) -> Job:
        return self._client.get(self.id)

    def status(self) -> str:
        return self.job().state.value

    def cancel(self) -> None:
        self._client.cancel(self.id)

    def result(self, timeout: float | None = None) -> R:
        """Wait for the result; raises JobFailed (with the remote traceback), JobCancelled,
        or JobTimeout (with the waiting reason) when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        notice = WaitingNotice(f"job {self.id[:12]}")
        try:
            while True:
                remaining = 30.0 if deadline is None else deadline - time.monotonic()
                # Short polls at first, so a job that cannot run says why within a second.
                early = time.monotonic() - notice.started < 3 * WAITING_NOTICE_S
                wait = min(remaining, 30.0, WAITING_NOTICE_S if early else 30.0)
                job = patiently(self._client.get, self.id, wait=max(0.0, wait))
                if job.state.terminal:
                    raise_for(job)
                    return decode_result(job.result, self._serializer)
                notice.update(job)
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeout(
                        f"job {self.id} is still {job.state.value} after {timeout} s"
                        + (f" ({job.waiting})" if job.waiting else ""),
                        job_id=self.id,
                    )
        finally:
            notice.close()


def patiently(read: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``read(*args, **kwargs)``, a question about stored jobs (safe to ask again), asked
    again for up to :data:`RECONNECT_S` while the gateway cannot be reached (a restart)."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    def say(state: Any) -> None:
        if state.attempt_number == 1:
            log.warning(
                "%s; asking again for up to %.0f s (the jobs are in its store)",
                state.outcome.exception(),
                RECONNECT_S,
            )

    for attempt in Retrying(
        retry=retry_if_exception_type(GatewayUnavailable),
        stop=stop_after_delay(RECONNECT_S),
        wait=wait_exponential(multiplier=0.2, max=3.0),
        before_sleep=say,
        reraise=True,
    ):
        with attempt:
            return read(*args, **kwargs)
    raise AssertionError("unreachable")  # pragma: no cover


#: Function option → JobSpec field, for the options a caller overrides with ``with_options``.
_SPEC_FIELDS = {
    "gpu": "gpu",
    "memory": "min_memory_gb",
    "labels": "labels",
    "fallback": "fallback",
    "priority": "priority",
    "timeout": "timeout_s",
    "retries": "max_retries",
}


def job_spec(
    fn: Function[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    idempotency_key: str | None = None,
) -> JobSpec:
    """The submission for one call.

    Only the options this caller changed (``with_options``) travel with it: the declaration
    the workers publish is the truth about the function, and the gateway holds the job to it
    (a change may narrow it, never widen it). The serializer always travels: the arguments
    are encoded with it.
    """
    changed: dict[str, Any] = {}
    for option, value in fn.overrides.items():
        if option in _SPEC_FIELDS:
            if option == "fallback":
                value = value or "none"
            changed[_SPEC_FIELDS[option]] = value
    return JobSpec(
        function=fn.path,
        payload=encode_arguments(args, kwargs, fn.options.serializer),
        serializer=fn.options.serializer,
        idempotency_key=idempotency_key,
        **changed,
    )


class GatewayBackend:
    """Jobs through a hostgpu gateway's durable queue."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def close(self) -> None:
        self.client.close()

    def spawn(
        self, fn: Function[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> JobHandle[R]:
        job = self.client.submit(job_spec(fn, args, kwargs))
        return JobHandle(job.id, fn.options.serializer, self.client)

    def call(self, fn: Function[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        """Submit and wait in one request; a job that takes longer is waited for as a
        handle (which says why it waits)."""
        job = self.client.submit(job_spec(fn, args, kwargs), wait=CALL_WAIT_S)
        if job.state.terminal:
            raise_for(job)
            return decode_result(job.result, fn.options.serializer)
        return JobHandle[R](job.id, fn.options.serializer, self.client).result()

    def map(
        self, fn: Function[..., R], items: Sequence[tuple[Any, ...]], options: MapOptions
    ) -> list[Any]:
        client = self.client
        serializer = fn.options.serializer
        results: list[Any] = [None] * len(items)
        pending: dict[str, int] = {}
        deadline = options.deadline()
        with map_progress(fn.__name__, len(items), enabled=options.progress) as bars:
            bar, submitted, finished = bars
            for start, chunk in options.chunks(items):
                ids = client.submit_batch([job_spec(fn, args, {}) for args in chunk])
                for offset, job_id in enumerate(ids):
                    pending[job_id] = start + offset
                bar.advance(submitted, len(chunk))
            while pending:
                remaining = 10.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(f"{len(pending)} of {len(items)} jobs unfinished")
                window = list(itertools.islice(pending, 1000))
                for job in patiently(client.results, window, timeout=min(10.0, remaining)):
                    index = pending.pop(job.id)
                    if job.state is JobState.succeeded:
                        results[index] = decode_result(job.result, serializer)
                    else:
                        try:
                            raise_for(job)
                        except (JobFailed, JobCancelled) as exc:
                            if not options.return_exceptions:
                                raise
                            results[index] = exc
                    bar.advance(finished)
        return results


class Function(Generic[P, R]):
    """A function that can run here or as a job on a worker with the right accelerator."""

    def __init__(
        self,
        fn: Callable[P, R],
        options: FunctionOptions,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.fn = fn
        self.options = options
        #: Options this caller changed with :meth:`with_options` (sent with each call).
        self.overrides = dict(overrides or {})
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", "function")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__module__ = fn.__module__

    def __repr__(self) -> str:
        return f"<hostgpu.Function {self.__module__}.{self.__qualname__} gpu={self.options.gpu}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    @property
    def path(self) -> str:
        return import_path(self.fn)

    def with_options(self, **changes: Any) -> Function[P, R]:
        """The same function with other options (``gpu=``, ``timeout=``, …) for this caller.

        The gateway still holds them to the published declaration: they may narrow it
        (``gpu="cuda:H100"`` on a ``gpu="gpu"`` function), never widen it.
        """
        options = FunctionOptions.model_validate({**self.options.model_dump(), **changes})
        return Function(self.fn, options, {**self.overrides, **changes})

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> Handle[R]:
        """Submit the call and return at once."""
        return default_backend().spawn(self, args, dict(kwargs))

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the call on a worker and return its result."""
        backend = default_backend()
        call = getattr(backend, "call", None)
        if call is not None:
            return call(self, args, dict(kwargs))
        return backend.spawn(self, args, dict(kwargs)).result()

    def map(
        self,
        *iterables: Iterable[Any],
        batch_size: int = 500,
        progress: bool = True,
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[R]:
        """One job per item (``zip`` of the iterables, like ``map``); results in order."""
        items = list(zip(*iterables, strict=False))
        options = MapOptions(batch_size, progress, return_exceptions, timeout)
        return default_backend().map(self, items, options)


class FunctionKwargs(TypedDict, total=False):
    """The options ``@function`` and ``register`` take; each left out (or None) keeps its
    default in :class:`~hostgpu.functions.FunctionOptions`."""

    gpu: str
    fallback: Literal["cpu"] | None
    timeout: float
    retries: int
    memory: float | None
    priority: int
    labels: dict[str, str] | None
    serializer: Literal["json", "pickle"]
    warm: bool


def _options(**given: Any) -> FunctionOptions:
    return FunctionOptions(**{k: v for k, v in given.items() if v is not None})


@overload
def function(fn: Callable[P, R], /) -> Function[P, R]: ...


@overload
def function(**options: Unpack[FunctionKwargs]) -> Callable[[Callable[P, R]], Function[P, R]]: ...


def function(
    fn: Callable[P, R] | None = None, /, **options: Unpack[FunctionKwargs]
) -> Function[P, R] | Callable[[Callable[P, R]], Function[P, R]]:
    """Declare and publish a function that can run as a job on a worker with the right device.

    ``gpu``: mps | cuda | cuda:<name> | mlx | gpu | cpu | any (default any). ``fallback="cpu"``
    lets it run on a CPU when no matching worker appears within the grace period (the result
    says so). ``timeout`` (seconds, default 600), ``retries`` (default 2), ``priority``
    (default 0), ``labels`` the worker must have. ``memory``: minimum accelerator memory in
    GB. ``serializer="pickle"`` accepts any picklable arguments, for callers and workers
    that trust each other only. ``warm``: the function keeps state between calls (a loaded
    model); see the README.
    """
    declared = _options(**options)  # validated now, not at submit time

    def wrap(f: Callable[P, R]) -> Function[P, R]:
        wrapped = Function(f, declared)
        publish(f, declared)
        return wrapped

    return wrap(fn) if fn is not None else wrap


def register(fn: Callable[P, R], **options: Unpack[FunctionKwargs]) -> Function[P, R]:
    """Publish an existing function (one you cannot decorate) with these options.

    Call it at import time of a module the worker imports: ``ingest = register(ingest_file,
    gpu="mps")``. The job's path stays the function's own (``its.module:name``).
    """
    declared = _options(**options)
    publish(fn, declared)
    return Function(fn, declared)
