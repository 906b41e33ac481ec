"""hostgpu: run accelerator work where the accelerator really is.

import hostgpu

@hostgpu.function(gpu="mps")
def embed(texts: list[str]) -> list[list[float]]:
    device = hostgpu.device()   # the accelerator the worker leased for this job
    ...
"""

from __future__ import annotations

from hostgpu import errors
from hostgpu.client import Client
from hostgpu.context import device, job_id
from hostgpu.errors import HostGPUError, JobCancelled, JobFailed, JobTimeout
from hostgpu.sdk import Function, JobHandle, Options, connect, function

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Function",
    "HostGPUError",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobTimeout",
    "Options",
    "__version__",
    "connect",
    "device",
    "errors",
    "function",
    "job_id",
]
