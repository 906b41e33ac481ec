"""Functions the Ray tests run on a real local cluster (imported by path on the Ray workers)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import hostgpu


def _node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


@hostgpu.function(gpu="mps", retries=0)
def on_mps() -> dict[str, Any]:
    return {"device": hostgpu.device(), "node": _node(), "job": hostgpu.job_id()}


@hostgpu.function(gpu="cpu", retries=0)
def on_cpu(x: int = 0) -> dict[str, Any]:
    return {"device": hostgpu.device(), "node": _node(), "x": x}


@hostgpu.function(gpu="cuda:H100", retries=0)
def on_h100() -> str:
    return hostgpu.device()


@hostgpu.function(gpu="cuda:H100", fallback="cpu", retries=0)
def h100_or_cpu() -> str:
    return hostgpu.device()


@hostgpu.function(gpu="any", retries=0)
def square(x: int) -> int:
    return x * x


@hostgpu.function(gpu="cpu", retries=0)
def boom(message: str) -> None:
    raise ValueError(message)


@hostgpu.function(gpu="cpu", retries=0, timeout=1.0)
def hang(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@hostgpu.function(gpu="cpu", retries=2)
def flaky(counter: str, failures: int) -> int:
    """Fails ``failures`` times (counted in a file), then returns the attempt number."""
    path = Path(counter)
    attempt = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(attempt))
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} fails on purpose")
    return attempt


@hostgpu.function(gpu="cpu", serializer="pickle", retries=0)
def union(a: set[int], b: set[int]) -> set[int]:
    return a | b


_MODEL: dict[str, Any] = {}
LOADS = 0


@hostgpu.function(gpu="mps", warm=True, retries=0)
def warm_model(text: str) -> dict[str, Any]:
    """Loads its "model" once per process, as the document pipeline's embedders do."""
    global LOADS
    if "model" not in _MODEL:
        LOADS += 1
        time.sleep(0.2)  # a (tiny) load
        _MODEL["model"] = str.upper
    return {
        "out": _MODEL["model"](text),
        "loads": LOADS,
        "pid": os.getpid(),
        "device": hostgpu.device(),
        "node": _node(),
    }


@hostgpu.function(gpu="mps", retries=0)
def survive(marker: str, seconds: float) -> dict[str, Any]:
    """Writes where it runs (node, pid), then works for a while: the tests stop it meanwhile."""
    Path(marker).write_text(f"{_node()} {os.getpid()}")
    time.sleep(seconds)
    return {"node": _node(), "device": hostgpu.device()}


def not_published(x: int) -> int:
    """A plain function: no decorator, so no Ray worker may run it."""
    return x
