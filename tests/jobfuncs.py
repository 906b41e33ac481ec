"""Job functions the runner tests execute in real worker child processes.

Everything a job may run is published with ``@hostgpu.function``; the module also holds
callables that are *not* published (a plain function, a class, imported modules) to prove
that a job naming them never runs.
"""

from __future__ import annotations

import builtins  # noqa: F401 - a job naming tests.jobfuncs:builtins.eval must be refused
import ctypes
import os
import subprocess  # noqa: F401 - a job naming tests.jobfuncs:subprocess.run must be refused
import sys
import time
from typing import Any

import hostgpu
import hostgpu.context

LOADS = 0


@hostgpu.function
def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


@hostgpu.function
def noop() -> None:
    return None


@hostgpu.function
def pid() -> int:
    return os.getpid()


@hostgpu.function
def device() -> str:
    return hostgpu.context.device()


@hostgpu.function
def job_id() -> str | None:
    return hostgpu.context.job_id()


@hostgpu.function
def load_model() -> int:
    """Pretend to load a model once per child: the counter survives between jobs."""
    global LOADS
    LOADS += 1
    return LOADS


@hostgpu.function
def boom(message: str) -> None:
    _inner_boom(message)


def _inner_boom(message: str) -> None:
    raise ValueError(message)


@hostgpu.function
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@hostgpu.function
def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


@hostgpu.function
def shout(nbytes: int, line: str = "") -> str:
    """Write ``line`` (whole) then ``nbytes`` to stdout through Python and as many to fd 2 at
    the C level (as an extension or a subprocess writes), and return normally."""
    if line:
        print(line, flush=True)
    chunk = "x" * min(nbytes, 1 << 20)
    left = nbytes
    while left > 0:
        sys.stdout.write(chunk[:left])
        os.write(2, chunk[:left].encode())
        left -= len(chunk)
    sys.stdout.flush()
    return "done"


@hostgpu.function
def hard_exit(code: int) -> None:
    os._exit(code)


@hostgpu.function
def segfault() -> None:
    ctypes.string_at(0)


@hostgpu.function
def not_json() -> Any:
    return {1, 2, 3}


@hostgpu.function
def nan() -> float:
    return float("nan")


@hostgpu.function(serializer="pickle")
def pickled_double(z: complex) -> complex:
    return z * 2


@hostgpu.function
def json_pair(a: Any, b: Any) -> Any:
    return {"sum": a + b, "type": type(a).__name__}


def unpublished(path: str) -> str:
    """A plain function: callable, importable, and never runnable as a job."""
    with open(path, "w") as handle:
        handle.write("ran")
    return "ran"


class Namespace:
    """A class is not a job either; its published static method is."""

    class Inner:
        @staticmethod
        def hello(name: str) -> str:
            return f"hello {name}"


hostgpu.register(Namespace.Inner.hello)
