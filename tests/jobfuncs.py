"""Job functions the runner tests execute in real worker child processes."""

from __future__ import annotations

import ctypes
import os
import time
from types import SimpleNamespace
from typing import Any

import hostgpu.context

LOADS = 0


def add(a: int, b: int, *, scale: int = 1) -> int:
    return (a + b) * scale


def noop() -> None:
    return None


def pid() -> int:
    return os.getpid()


def device() -> str:
    return hostgpu.context.device()


def job_id() -> str | None:
    return hostgpu.context.job_id()


def load_model() -> int:
    """Pretend to load a model once per child: the counter survives between jobs."""
    global LOADS
    LOADS += 1
    return LOADS


def boom(message: str) -> None:
    _inner_boom(message)


def _inner_boom(message: str) -> None:
    raise ValueError(message)


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sleep_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def hard_exit(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    ctypes.string_at(0)


def not_json() -> Any:
    return {1, 2, 3}


def nan() -> float:
    return float("nan")


def _pair(a: Any, b: Any) -> Any:
    return {"sum": a + b, "type": type(a).__name__}


def _complex(z: complex) -> complex:
    return z * 2


class _Wrapper:
    """A stand-in for the SDK's Function wrapper: ``fn`` and ``options.serializer``."""

    def __init__(self, fn: Any, serializer: str) -> None:
        self.fn = fn
        self.options = SimpleNamespace(serializer=serializer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


pickled_double = _Wrapper(_complex, "pickle")
json_pair = _Wrapper(_pair, "json")


class Namespace:
    class Inner:
        @staticmethod
        def hello(name: str) -> str:
            return f"hello {name}"
