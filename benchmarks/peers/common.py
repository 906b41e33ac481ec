"""Shared by the peer drivers (run in ``.venv-peers``): timing, worker processes, JSON out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379


def redis_url(db: int) -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


def percentile(values: list[float], q: float) -> float:
    """The same nearest-rank rule as ``benchmarks/dispatch.py``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(name: str, rate: float, lat: list[float], note: str = "") -> dict[str, object]:
    return {
        "name": name,
        "rate": rate,
        "p50": percentile(lat, 0.5),
        "p99": percentile(lat, 0.99),
        "note": note,
    }


def emit(rows: list[dict[str, object]]) -> None:
    """One JSON line per row on stdout, read by ``benchmarks/peers.py``."""
    for r in rows:
        print(json.dumps(r), flush=True)


class Fleet:
    """Worker processes started with the venv's own scripts, logs under ``log_dir``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(HERE))
        proc = subprocess.Popen(
            list(argv),
            cwd=HERE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group per worker, for a clean stop
        )
        self.procs.append(proc)
        return proc

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {proc.args!r} exited with {proc.returncode}")

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()


def bin_path(name: str) -> str:
    """A console script of the running venv (``celery``, ``rq``)."""
    return str(Path(sys.executable).parent / name)
