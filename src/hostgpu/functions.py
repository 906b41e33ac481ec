"""Published functions: their declared options, the registry workers run from, and the rule
that merges a submission's options with the declaration.

The trust boundary of a worker is this registry: a job can name only a function published
with ``@hostgpu.function`` (or :func:`register`) in a module its worker imports — never an
arbitrary attribute such as ``os.system``. A function's declared options hold whoever submits
it (SDK, CLI, curl): a submission may narrow them, never widen them (:func:`resolve`).

Keep this module light: every worker child imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hostgpu.errors import ConfigError, OptionsConflict
from hostgpu.requirements import (
    GPU_PATTERN,
    NOT_BOOL,
    LabelKey,
    LabelValue,
    Requirements,
    closed_keys,
    normalise_gpu,
)

Serializer = Literal["json", "pickle"]


class FunctionOptions(BaseModel):
    """What a function declares about how it must run (published by the workers that import it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: str = Field(
        default="any",
        description="mps | cuda | cuda:<name> | mlx | gpu (any accelerator) | cpu | any",
        json_schema_extra={"pattern": GPU_PATTERN},
    )
    fallback: Literal["cpu"] | None = Field(
        default=None, description='"cpu": may run on a CPU after the grace period'
    )
    timeout: Annotated[float, Field(gt=0, le=7 * 24 * 3600), NOT_BOOL] = Field(
        default=600.0, description="seconds"
    )
    retries: Annotated[int, Field(ge=0, le=100), NOT_BOOL] = Field(
        default=2, description="re-runs after a failure"
    )
    memory: Annotated[float, Field(ge=0, le=100_000), NOT_BOOL] | None = Field(
        default=None, description="minimum accelerator memory, GB"
    )
    priority: Annotated[int, Field(ge=-1000, le=1000), NOT_BOOL] = 0
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=16, json_schema_extra=closed_keys
    )
    serializer: Serializer = "json"
    warm: bool = Field(
        default=False,
        description="keeps state between calls (a loaded model): hostgpu workers keep their "
        "children alive anyway; on Ray it runs in an actor pinned to the device",
    )

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str) -> str:
        return normalise_gpu(value)

    def requirements(self) -> Requirements:
        return Requirements(gpu=self.gpu, min_memory_gb=self.memory, labels=self.labels)


@dataclass(frozen=True)
class Published:
    """A function a worker may run: its import path, the callable and its declared options."""

    path: str
    fn: Callable[..., Any]
    options: FunctionOptions

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]


_registry: dict[str, Published] = {}


def import_path(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of a function a worker can import."""
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


def publish(fn: Callable[..., Any], options: FunctionOptions) -> Published | None:
    """Add a function to this process's registry; None when it has no importable path
    (a script's or a local function: it can still run locally, never on a worker)."""
    try:
        path = import_path(fn)
    except ConfigError:
        return None
    entry = Published(path, fn, options)
    _registry[path] = entry
    return entry


def lookup(path: str) -> Published | None:
    """The published function at ``path`` (its module must already be imported)."""
    return _registry.get(path)


def published(modules: Iterable[str] | None = None) -> dict[str, FunctionOptions]:
    """The declared options of every published function (in ``modules`` when given)."""
    wanted = None if modules is None else set(modules)
    return {
        path: entry.options
        for path, entry in sorted(_registry.items())
        if wanted is None or entry.module in wanted
    }


def not_published_message(path: str) -> str:
    return (
        f"{path} is not a hostgpu function: only functions decorated with @hostgpu.function "
        "(or registered with hostgpu.register) in a module the worker imports can run as jobs"
    )


# -- the merge rule ---------------------------------------------------------------------------
class Requested(BaseModel):
    """The options a submission states explicitly (None: take the declared one)."""

    model_config = ConfigDict(frozen=True)

    gpu: str | None = None
    min_memory_gb: float | None = None
    labels: dict[LabelKey, LabelValue] | None = Field(
        default=None, max_length=16, json_schema_extra=closed_keys
    )
    fallback: Literal["cpu", "none"] | None = None
    timeout_s: float | None = None
    max_retries: int | None = None
    priority: int | None = None
    serializer: Serializer | None = None


class Resolved(BaseModel):
    """A job's effective options: the declaration, narrowed by the submission."""

    model_config = ConfigDict(frozen=True)

    requirements: Requirements
    fallback: Literal["cpu"] | None
    timeout_s: float
    max_retries: int
    priority: int
    serializer: Serializer


def _gpu_within(requested: str, declared: str) -> bool:
    """Whether ``requested`` asks for a subset of the devices ``declared`` allows."""
    if declared == "any" or requested == declared:
        return True
    r_kind, _, r_name = requested.partition(":")
    d_kind, _, d_name = declared.partition(":")
    if declared == "gpu":
        return r_kind in ("cuda", "mps", "mlx", "gpu")
    if r_kind != d_kind:
        return False
    if not d_name:  # cuda → cuda:<name>
        return True
    return bool(r_name) and d_name in r_name  # cuda:h100 → cuda:h100 sxm


def resolve(path: str, declared: FunctionOptions | None, requested: Requested) -> Resolved:
    """Merge a submission with the function's declaration (defaults when none is known).

    A submission may narrow what was declared (a specific accelerator, more memory, extra
    labels, a shorter timeout, fewer retries, no fallback) and set the priority; anything that
    widens it raises :class:`OptionsConflict` naming both values.
    """
    base = declared or FunctionOptions()
    conflicts: list[str] = []

    def conflict(field: str, asked: object, had: object) -> None:
        conflicts.append(f"{field}={asked!r} conflicts with {path}'s declared {field}={had!r}")

    gpu = base.gpu
    if requested.gpu is not None:
        asked = normalise_gpu(requested.gpu)
        to_cpu = asked in ("cpu", "any") and base.fallback == "cpu"
        if declared is not None and not (_gpu_within(asked, base.gpu) or to_cpu):
            conflict("gpu", asked, base.gpu)
        gpu = asked
    memory = base.memory
    if requested.min_memory_gb is not None:
        if declared is not None and base.memory and requested.min_memory_gb < base.memory:
            conflict("min_memory_gb", requested.min_memory_gb, base.memory)
        memory = requested.min_memory_gb
    labels = dict(base.labels)
    for key, value in (requested.labels or {}).items():
        if declared is not None and key in base.labels and base.labels[key] != value:
            conflict(f"labels[{key}]", value, base.labels[key])
        labels[key] = value
    fallback = base.fallback
    if requested.fallback is not None:
        if requested.fallback == "cpu" and declared is not None and base.fallback != "cpu":
            conflict("fallback", "cpu", base.fallback)
        fallback = "cpu" if requested.fallback == "cpu" else None
    timeout = base.timeout
    if requested.timeout_s is not None:
        if declared is not None and requested.timeout_s > base.timeout:
            conflict("timeout", requested.timeout_s, base.timeout)
        timeout = requested.timeout_s
    retries = base.retries
    if requested.max_retries is not None:
        if declared is not None and requested.max_retries > base.retries:
            conflict("retries", requested.max_retries, base.retries)
        retries = requested.max_retries
    serializer = base.serializer
    if requested.serializer is not None:
        if declared is not None and requested.serializer != base.serializer:
            conflict("serializer", requested.serializer, base.serializer)
        serializer = requested.serializer
    if conflicts:
        raise OptionsConflict(
            "; ".join(conflicts)
            + " (a submission may narrow a function's declared options, never widen them)"
        )
    return Resolved(
        requirements=Requirements(gpu=gpu, min_memory_gb=memory, labels=labels),
        fallback=fallback,
        timeout_s=timeout,
        max_retries=retries,
        priority=base.priority if requested.priority is None else requested.priority,
        serializer=serializer,
    )
