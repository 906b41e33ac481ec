"""Job functions the end-to-end tests run on real workers (imported by path)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import hostgpu


@hostgpu.function(gpu="cpu", retries=0)
def add(a: int, b: int = 0) -> int:
    return a + b


@hostgpu.function(gpu="any", retries=0)
def where() -> dict[str, Any]:
    return {"device": hostgpu.device(), "pid": os.getpid(), "job": hostgpu.job_id()}


@hostgpu.function(gpu="cpu", retries=0)
def boom(message: str) -> None:
    raise ValueError(message)


@hostgpu.function(gpu="cpu", retries=0)
def boom_at_length(size: int) -> None:
    raise ValueError("y" * size)


@hostgpu.function(gpu="cpu", retries=0)
def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@hostgpu.function(gpu="cpu", retries=0)
def undecodable_names() -> list[str]:
    """What os.listdir gives for a file name that is not valid UTF-8: a lone surrogate."""
    with tempfile.TemporaryDirectory() as folder:
        Path(os.fsdecode(os.path.join(os.fsencode(folder), b"f\xff.txt"))).touch()
        return os.listdir(folder)


@hostgpu.function(gpu="cpu", retries=0)
def boom_undecodable() -> None:
    name = os.fsdecode(b"f\xff.txt")
    raise FileNotFoundError(f"no such file: {name}")


@hostgpu.function(gpu="cpu", retries=0)
def change_process_state() -> str:
    os.chdir("/")
    os.environ["PROBE_LEAK"] = "1"
    os.environ.pop("HOME", None)
    os.environ["PATH"] = "/nowhere"
    return os.getcwd()


@hostgpu.function(gpu="cpu", retries=0)
def process_state() -> dict[str, Any]:
    env = os.environ
    return {
        "cwd": os.getcwd(),
        "leak": env.get("PROBE_LEAK"),
        "home": env.get("HOME"),
        "path": env.get("PATH"),
    }


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@hostgpu.function(gpu="cpu", retries=0)
def raise_unprintable() -> None:
    raise Unprintable()


@hostgpu.function(gpu="cpu", retries=0)
def fork_and_return() -> str:
    os.fork()  # both copies return from here; only the child that ran the job may answer
    return "forked"


@hostgpu.function(gpu="cpu", retries=0, timeout=1.0)
def hang(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@hostgpu.function(gpu="cpu", retries=0)
def exit_hard(code: int) -> None:
    os._exit(code)


@hostgpu.function(gpu="cpu", retries=0)
def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


@hostgpu.function(gpu="cpu", retries=3)
def flaky(marker: str, failures: int) -> int:
    """Fail ``failures`` times (counted in a file), then succeed with the attempt number."""
    path = Path(marker)
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < failures:
        raise RuntimeError(f"failure {count + 1} of {failures}")
    return count + 1


@hostgpu.function(gpu="cpu", retries=2, timeout=60)
def slow_record(marker: str, seconds: float) -> str:
    """Record each execution (append a line), then sleep: used to kill workers mid-job."""
    with open(marker, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return "done"


@hostgpu.function(gpu="mps", retries=0)
def needs_mps() -> str:
    return hostgpu.device()


@hostgpu.function(gpu="mps", fallback="cpu", retries=0)
def mps_or_cpu() -> str:
    return hostgpu.device()


@hostgpu.function(gpu="cpu", retries=0)
def big_result(size: int) -> str:
    return "x" * size


@hostgpu.function(gpu="cpu", retries=0, serializer="pickle")
def pickled(value: Any) -> Any:
    return value


@hostgpu.function(gpu="cpu", retries=0)
def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@hostgpu.function(gpu="mps", retries=0, timeout=60)
def declared_mps(note: str = "") -> dict[str, Any]:
    """Declared for Metal: wherever it is submitted from, it must run on mps or not at all."""
    return {"device": hostgpu.device(), "note": note}


@hostgpu.function(gpu="cpu", retries=0)
def input_size(digest: str) -> int:
    """The size of one of the job's fetched inputs."""
    return hostgpu.context.input_path(digest).stat().st_size
