"""The SDK: ``@hostgpu.function`` and what it returns.

@hostgpu.function(gpu="mps", timeout=60)
def embed(texts: list[str]) -> list[list[float]]: ...

embed(["hi"])                 # runs here, now
embed.remote(["hi"])          # runs on a worker with mps, returns the result
handle = embed.spawn(["hi"])  # returns at once; handle.result(timeout=…)
embed.map(batches)            # many jobs, results in order, with a progress bar
"""

from __future__ import annotations

import base64
import itertools
import json
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Literal, ParamSpec, TypeVar, overload

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from hostgpu.client import Client
from hostgpu.errors import ConfigError, JobCancelled, JobFailed, JobTimeout
from hostgpu.jobs import Job, JobSpec, JobState, Requirements

P = ParamSpec("P")
R = TypeVar("R")

_client_lock = threading.Lock()
_client: Client | None = None


def connect(gateway: str | None = None, token: str | None = None) -> Client:
    """Point the SDK at a gateway (default: HOSTGPU_GATEWAY / HOSTGPU_TOKEN or `hostgpu up`)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = Client(gateway, token)
        return _client


def default_client() -> Client:
    global _client
    with _client_lock:
        if _client is None:
            _client = Client()
        return _client


@dataclass(frozen=True)
class Options:
    gpu: str = "any"
    fallback: Literal["cpu"] | None = None
    timeout: float = 600.0
    retries: int = 2
    memory: float | None = None
    priority: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    serializer: Literal["json", "pickle"] = "json"

    def requirements(self) -> Requirements:
        return Requirements(gpu=self.gpu, min_memory_gb=self.memory, labels=self.labels)


def import_path(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function the worker can import."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None or not spec.name:
            raise ConfigError(
                f"{fn.__qualname__} is defined in a script run as __main__; workers import "
                "functions by module path: move it into a module (or run with `python -m`)"
            )
        module = spec.name
    if "<locals>" in fn.__qualname__:
        raise ConfigError(f"{fn.__qualname__} is a local function; define it at module level")
    return f"{module}:{fn.__qualname__}"


def encode_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str) -> Any:
    if serializer == "pickle":
        return base64.b64encode(pickle.dumps((args, kwargs))).decode()
    payload = {"args": list(args), "kwargs": kwargs}
    try:
        json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"arguments must be JSON values ({exc}); pass plain data, or declare the function "
            "with serializer='pickle' (only between parties that trust each other)"
        ) from exc
    return payload


def decode_result(value: Any, serializer: str) -> Any:
    if serializer == "pickle" and isinstance(value, str):
        return pickle.loads(base64.b64decode(value))
    return value


def raise_for(job: Job) -> None:
    if job.state is JobState.failed:
        error = job.error or {}
        raise JobFailed(
            f"job {job.id} ({job.function}) failed after {job.attempts} attempt(s): "
            f"{error.get('type', 'Error')}: {error.get('message', '')}",
            job_id=job.id,
            error_type=error.get("type"),
            remote_traceback=error.get("traceback"),
        )
    if job.state is JobState.cancelled:
        raise JobCancelled(f"job {job.id} was cancelled", job_id=job.id)


class JobHandle(Generic[R]):
    """A submitted job."""

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
        or JobTimeout when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = 30.0 if deadline is None else deadline - time.monotonic()
            job = self._client.get(self.id, wait=max(0.0, min(remaining, 30.0)))
            if job.state.terminal:
                raise_for(job)
                return decode_result(job.result, self._serializer)
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(
                    f"job {self.id} is still {job.state.value} after {timeout} s"
                    + (f" ({job.waiting})" if job.waiting else ""),
                    job_id=self.id,
                )


class Function(Generic[P, R]):
    """A function that can run here or as a job on a worker with the right accelerator."""

    def __init__(self, fn: Callable[P, R], options: Options) -> None:
        self.fn = fn
        self.options = options
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
        """The same function with other options (``gpu=``, ``timeout=``, …)."""
        return Function(self.fn, replace(self.options, **changes))

    def spec(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], idempotency_key: str | None = None
    ) -> JobSpec:
        o = self.options
        return JobSpec(
            function=self.path,
            payload=encode_arguments(args, kwargs, o.serializer),
            serializer=o.serializer,
            requirements=o.requirements(),
            fallback=o.fallback,
            priority=o.priority,
            timeout_s=o.timeout,
            max_retries=o.retries,
            idempotency_key=idempotency_key,
        )

    def spawn(self, *args: P.args, **kwargs: P.kwargs) -> JobHandle[R]:
        """Submit the job and return at once."""
        client = default_client()
        job = client.submit(self.spec(args, dict(kwargs)))
        return JobHandle(job.id, self.options.serializer, client)

    def remote(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the job on a worker and return its result."""
        return self.spawn(*args, **kwargs).result()

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
        client = default_client()
        serializer = self.options.serializer
        results: list[Any] = [None] * len(items)
        pending: dict[str, int] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, disable=not progress, transient=False) as bar:
            submitted = bar.add_task(f"submit {self.__name__}", total=len(items))
            finished = bar.add_task(f"run {self.__name__}", total=len(items))
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                ids = client.submit_batch([self.spec(args, {}) for args in chunk])
                for offset, job_id in enumerate(ids):
                    pending[job_id] = start + offset
                bar.advance(submitted, len(chunk))
            while pending:
                remaining = 10.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(f"{len(pending)} of {len(items)} jobs unfinished")
                window = list(itertools.islice(pending, 1000))
                for job in client.wait(window, timeout=min(10.0, remaining)):
                    index = pending.pop(job.id)
                    if job.state is JobState.succeeded:
                        results[index] = decode_result(job.result, serializer)
                    else:
                        try:
                            raise_for(job)
                        except (JobFailed, JobCancelled) as exc:
                            if not return_exceptions:
                                raise
                            results[index] = exc
                    bar.advance(finished)
        return results


@overload
def function(fn: Callable[P, R], /) -> Function[P, R]: ...


@overload
def function(
    *,
    gpu: str = "any",
    fallback: Literal["cpu"] | None = None,
    timeout: float = 600.0,
    retries: int = 2,
    memory: float | None = None,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    serializer: Literal["json", "pickle"] = "json",
) -> Callable[[Callable[P, R]], Function[P, R]]: ...


def function(
    fn: Callable[P, R] | None = None,
    /,
    *,
    gpu: str = "any",
    fallback: Literal["cpu"] | None = None,
    timeout: float = 600.0,
    retries: int = 2,
    memory: float | None = None,
    priority: int = 0,
    labels: dict[str, str] | None = None,
    serializer: Literal["json", "pickle"] = "json",
) -> Function[P, R] | Callable[[Callable[P, R]], Function[P, R]]:
    """Declare a function that can run as a job on a worker with the right accelerator.

    ``gpu``: mps | cuda | cuda:<name> | gpu | cpu | any. ``fallback="cpu"`` lets it run on
    a CPU when no matching worker appears within the grace period (the result says so).
    ``memory``: minimum accelerator memory in GB. ``serializer="pickle"`` accepts any
    picklable arguments, for callers and workers that trust each other only.
    """
    Requirements(gpu=gpu, min_memory_gb=memory)  # validate now, not at submit time
    options = Options(
        gpu=gpu,
        fallback=fallback,
        timeout=timeout,
        retries=retries,
        memory=memory,
        priority=priority,
        labels=dict(labels or {}),
        serializer=serializer,
    )

    def wrap(f: Callable[P, R]) -> Function[P, R]:
        return Function(f, options)

    return wrap(fn) if fn is not None else wrap
