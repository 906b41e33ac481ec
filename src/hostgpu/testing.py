"""Real gateway and worker processes on 127.0.0.1, for tests, benchmarks and chaos runs.

Everything here starts the same commands a user would (``python -m hostgpu gateway``,
``python -m hostgpu worker``) as child processes, and talks to them over HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hostgpu.client import Client
from hostgpu.processes import free_port, healthy, hostgpu_command, stop_process, worker_command


def child_env(home: Path, pythonpath: str = "", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(
        HOSTGPU_HOME=str(home),
        PYTHONPATH=os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).strip(os.pathsep),
        HF_HUB_OFFLINE="1",
        HOSTGPU_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


@dataclass
class Gateway:
    home: Path
    database_url: str
    port: int = field(default_factory=free_port)
    env_extra: dict[str, str] = field(default_factory=dict)
    pythonpath: str = ""
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Gateway:
        log = open(self.home / f"gateway-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            hostgpu_command(
                "gateway",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database-url",
                self.database_url,
            ),
            env=child_env(self.home, self.pythonpath, **self.env_extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_text()}")
            if healthy(self.url):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start: {self.log_text()}")
            time.sleep(0.05)
        token_file = self.home / "admin-token"
        if not self.token and token_file.exists():
            self.token = token_file.read_text().strip()
        return self

    def log_text(self) -> str:
        return (self.home / f"gateway-{self.port}.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 10)

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token or self.token)

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token or self.token}"},
            timeout=30,
        )

    def requests_to(self, route: str) -> float:
        """How many HTTP requests the gateway has served on ``route`` (from its metrics)."""
        with self.http() as http:
            text = http.get("/metrics").raise_for_status().text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "hostgpu_http_requests"
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels.get("route") == route
        )


@dataclass
class Worker:
    gateway: Gateway
    imports: tuple[str, ...] = ()
    concurrency: int = 1
    name: str = ""
    extra_args: tuple[str, ...] = ()
    env_extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    #: The token it joins with (default: the gateway's admin token).
    token: str = ""

    def command_line(self, name: str) -> list[str]:
        return worker_command(
            self.gateway.url, self.imports, self.concurrency, "--name", name, *self.extra_args
        )

    def start(self, wait: bool = True) -> Worker:
        name = self.name or f"w{uuid.uuid4().hex[:6]}"
        self.name = name
        args = self.command_line(name)
        log = open(self.gateway.home / f"worker-{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            env=child_env(
                self.gateway.home,
                self.gateway.pythonpath,
                HOSTGPU_TOKEN=self.token or self.gateway.token,
                **self.env_extra,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_registered()
        return self

    def wait_registered(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.gateway.http() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {self.log_text()}")
                workers = http.get("/v1/workers", params={"alive": True}).json()["workers"]
                # Registered and publishing: its first child has imported its modules.
                if any(
                    w["capabilities"]["name"] == self.name and w["capabilities"]["functions"]
                    for w in workers
                ):
                    return
                time.sleep(0.1)
        raise RuntimeError(f"worker did not register: {self.log_text()}")

    def log_text(self) -> str:
        return (self.gateway.home / f"worker-{self.name}.log").read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            # The whole process group would include its children; SIGKILL only the
            # parent, as a crash would, and let its orphans notice the closed pipe.
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        return stop_process(self.proc, timeout)


@dataclass
class ModelServer(Worker):
    """``hostgpu serve MODEL…`` (or, with ``share``, ``hostgpu share --models …``)."""

    models: tuple[str, ...] = ("smollm2",)
    share: bool = False

    def command_line(self, name: str) -> list[str]:
        if self.share:
            return hostgpu_command(
                "share",
                "--gateway",
                self.gateway.url,
                "--models",
                ",".join(self.models),
                "--max-concurrency",
                str(self.concurrency),
                "--name",
                name,
                *self.extra_args,
            )
        return hostgpu_command(
            "serve",
            *self.models,
            "--gateway",
            self.gateway.url,
            "--max-concurrency",
            str(self.concurrency),
            "--name",
            name,
            *self.extra_args,
        )
