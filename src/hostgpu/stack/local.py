"""`hostgpu up`: a gateway and one native worker on this machine, nothing to configure."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import IO

import httpx

from hostgpu.errors import ConfigError, HostGPUError
from hostgpu.processes import free_port, hostgpu_command, port_free, stop_process
from hostgpu.settings import Settings


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


class LocalStack:
    """Gateway and worker as child processes, logging to HOSTGPU_HOME/logs."""

    def __init__(
        self,
        settings: Settings,
        *,
        port: int | None = None,
        concurrency: int = 1,
        imports: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
        port_given: bool = False,
    ) -> None:
        self.settings = settings
        self.port_given = port_given  # a busy --port is an error; a busy default moves
        self.home = settings.home_dir
        self.port = port or settings.port
        self.concurrency = concurrency
        self.imports = imports
        self.env = {**os.environ, "HOSTGPU_HOME": str(self.home), **(extra_env or {})}
        self.env.pop("HOSTGPU_GATEWAY", None)
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.logs = self.home / "logs"
        self._files: list[IO[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._files.append(log)
        # A session of its own: Ctrl-C reaches only `hostgpu up`, which then stops the
        # worker warm before the gateway, instead of everything dying at once.
        return subprocess.Popen(
            hostgpu_command(*args),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start_gateway(self, timeout: float = 60.0) -> None:
        if not port_free("127.0.0.1", self.port):
            if healthy(self.url):
                raise ConfigError(
                    f"a gateway already answers on {self.url}: use it (hostgpu jobs, hostgpu "
                    "demo), or stop it first (`hostgpu down` if `hostgpu up` started it)"
                )
            if self.port_given:
                raise ConfigError(
                    f"port {self.port} is in use by another program: choose another --port, "
                    "or leave it out to take a free one"
                )
            self.port = free_port()
        self.gateway = self._spawn(
            "gateway", ["gateway", "--host", "127.0.0.1", "--port", str(self.port)], self.env
        )
        deadline = time.monotonic() + timeout
        while not healthy(self.url):
            if self.gateway.poll() is not None:
                raise HostGPUError(
                    f"the gateway exited with code {self.gateway.returncode}:\n"
                    f"{self._tail('gateway')}"
                )
            if time.monotonic() > deadline:
                raise HostGPUError(f"the gateway did not answer within {timeout:.0f} s")
            time.sleep(0.1)
        (self.home / "gateway-url").write_text(self.url + "\n")

    def admin_token(self) -> str:
        path = self.home / "admin-token"
        if not path.exists():
            raise ConfigError(
                f"{path} is missing: this HOSTGPU_HOME's database has tokens from elsewhere; "
                "set HOSTGPU_TOKEN to an admin token"
            )
        return path.read_text().strip()

    def start_worker(self, timeout: float = 120.0) -> None:
        env = {**self.env, "HOSTGPU_TOKEN": self.settings.token or self.admin_token()}
        args = ["worker", "--gateway", self.url, "--concurrency", str(self.concurrency)]
        args += [arg for module in self.imports for arg in ("--import", module)]
        self.worker = self._spawn("worker", args, env)
        headers = {"Authorization": f"Bearer {env['HOSTGPU_TOKEN']}"}
        deadline = time.monotonic() + timeout
        while True:
            if self.worker.poll() is not None:
                raise HostGPUError(
                    f"the worker exited with code {self.worker.returncode}:\n{self._tail('worker')}"
                )
            reply = httpx.get(f"{self.url}/v1/workers", params={"alive": True}, headers=headers)
            if reply.status_code == 200 and any(
                w["capabilities"]["functions"] for w in reply.json()["workers"]
            ):
                return
            if time.monotonic() > deadline:
                raise HostGPUError(f"the worker did not register within {timeout:.0f} s")
            time.sleep(0.2)

    def start(self) -> None:
        try:
            self.start_gateway()
            self.start_worker()
        except BaseException:
            self.stop(grace=5)
            raise

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.gateway, self.worker))

    def stop(self, *, grace: float = 30.0, cold: bool = False) -> None:
        """Worker first (warm stop, finishing its jobs), then the gateway."""
        stop_process(self.worker, grace, cold=cold)
        stop_process(self.gateway, grace)
        for handle in self._files:
            handle.close()
        self._files.clear()

    def log_paths(self) -> list[Path]:
        return [self.logs / "gateway.log", self.logs / "worker.log"]
