"""Small built-in jobs every worker offers: where am I, and how fast is this device."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from hostgpu.context import device
from hostgpu.sdk import function


@function(gpu="any", timeout=60, retries=0)
def whoami() -> dict[str, Any]:
    """Where the job ran: host, process, and the device it was given."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "device": device(),
    }


@function(gpu="any", timeout=300, retries=0)
def matmul(size: int = 1024, repeat: int = 10) -> dict[str, Any]:
    """Multiply two ``size``×``size`` float32 matrices on the job's device; report GFLOP/s."""
    try:
        import torch
    except ImportError:
        return {"device": device(), "error": "torch is not installed on this worker"}
    from hostgpu.devices.smoke import time_torch_matmul

    seconds = time_torch_matmul(torch, device(), size, repeat, warmup=1)
    return {
        "device": device(),
        "size": size,
        "ms": seconds * 1e3,
        "gflops": 2 * size**3 / seconds / 1e9,
    }


@function(gpu="any", timeout=60, retries=0)
def noop(x: Any = None) -> Any:
    """Return the argument: the unit of dispatch overhead in the benchmarks."""
    return x
