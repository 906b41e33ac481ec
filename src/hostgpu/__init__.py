"""hostgpu: run accelerator work where the accelerator really is.

import hostgpu

@hostgpu.function(gpu="mps")
def embed(texts: list[str]) -> list[list[float]]:
    device = hostgpu.device()   # the accelerator the worker leased for this job
    ...

The package face is lazy (PEP 562): ``import hostgpu`` loads nothing heavy, so a worker's
child process that imports a job module pays only for what that module uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name → module that defines it
_EXPORTS: dict[str, str] = {
    "Client": "hostgpu.client",
    "Function": "hostgpu.sdk",
    "FunctionOptions": "hostgpu.functions",
    "HostGPUError": "hostgpu.errors",
    "JobCancelled": "hostgpu.errors",
    "JobFailed": "hostgpu.errors",
    "JobHandle": "hostgpu.sdk",
    "JobTimeout": "hostgpu.errors",
    "connect": "hostgpu.sdk",
    "device": "hostgpu.context",
    "function": "hostgpu.sdk",
    "job_id": "hostgpu.context",
    "register": "hostgpu.sdk",
}

__all__ = [
    "Client",
    "Function",
    "FunctionOptions",
    "HostGPUError",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobTimeout",
    "__version__",
    "connect",
    "device",
    "errors",
    "function",
    "job_id",
    "register",
]

if TYPE_CHECKING:
    from hostgpu import errors
    from hostgpu.client import Client
    from hostgpu.context import device, job_id
    from hostgpu.errors import HostGPUError, JobCancelled, JobFailed, JobTimeout
    from hostgpu.functions import FunctionOptions
    from hostgpu.sdk import Function, JobHandle, connect, function, register


def __getattr__(name: str) -> Any:
    if name == "errors":
        return importlib.import_module("hostgpu.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hostgpu' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
