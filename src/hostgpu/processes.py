"""Child processes hostgpu starts itself: free ports, its own command line, a clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound (a listener would get it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def healthy(url: str, timeout: float = 1.0) -> bool:
    """Whether the server at ``url`` (a gateway or model server hostgpu started) answers its
    health check."""
    try:
        return httpx.get(f"{url}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def hostgpu_command(*args: str) -> list[str]:
    """``hostgpu ARGS…`` run by this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "hostgpu", *args]


def worker_command(
    gateway: str, modules: Sequence[str], concurrency: int, *extra: str
) -> list[str]:
    """The command line of a native worker."""
    args = hostgpu_command("worker", "--gateway", gateway, "--concurrency", str(concurrency))
    for module in modules:
        args += ["--import", module]
    return [*args, *extra]


def stop_process(
    proc: subprocess.Popen[bytes] | None, grace: float, *, cold: bool = False
) -> int | None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; returns the exit status.

    ``cold`` sends a second SIGTERM shortly after the first: hostgpu's own processes read
    that as "stop now and hand the running jobs back" instead of finishing them.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        if cold:
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
