"""`hostgpu up`: a gateway and one native worker on this machine, nothing to configure."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import IO

import httpx

from hostgpu.errors import ConfigError, HostGPUError
from hostgpu.processes import free_port, healthy, hostgpu_command, port_free, stop_process
from hostgpu.settings import Settings


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
        models: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.port_given = port_given  # a busy --port is an error; a busy default moves
        self.home = settings.home_dir
        self.port = port or settings.port
        self.concurrency = concurrency
        self.imports = imports
        self.models = models
        self.env = {**os.environ, "HOSTGPU_HOME": str(self.home), **(extra_env or {})}
        self.env.pop("HOSTGPU_GATEWAY", None)
        self.gateway: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.model_server: subprocess.Popen[bytes] | None = None
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
        args = ["worker", "--gateway", self.url, "--concurrency", str(self.concurrency)]
        args += [arg for module in self.imports for arg in ("--import", module)]
        # Kept before the wait: a stop that interrupts the wait must find the process.
        self.worker = self._spawn("worker", args, self._worker_env())
        self._wait_registered(self.worker, "worker", "functions", timeout)

    def start_model_server(self, timeout: float = 120.0) -> None:
        """``hostgpu serve`` for ``models`` (they load on first use)."""
        args = ["serve", *self.models, "--gateway", self.url]
        self.model_server = self._spawn("model-server", args, self._worker_env())
        self._wait_registered(self.model_server, "model-server", "models", timeout)

    def _worker_env(self) -> dict[str, str]:
        return {**self.env, "HOSTGPU_TOKEN": self.settings.token or self.admin_token()}

    def _wait_registered(
        self, proc: subprocess.Popen[bytes], name: str, serves: str, timeout: float
    ) -> None:
        """Wait until a worker process has registered its functions (or models)."""
        headers = {"Authorization": f"Bearer {self._worker_env()['HOSTGPU_TOKEN']}"}
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise HostGPUError(
                    f"the {name} exited with code {proc.returncode}:\n{self._tail(name)}"
                )
            reply = httpx.get(f"{self.url}/v1/workers", params={"alive": True}, headers=headers)
            if reply.status_code == 200 and any(
                w["capabilities"]["functions"] and w["capabilities"]["serves"] == serves
                for w in reply.json()["workers"]
            ):
                return
            if time.monotonic() > deadline:
                raise HostGPUError(f"the {name} did not register within {timeout:.0f} s")
            time.sleep(0.2)

    def start(self) -> None:
        try:
            self.start_gateway()
            self.start_worker()
            if self.models:
                self.start_model_server()
        except BaseException:
            self.stop(grace=5)
            raise

    def alive(self) -> bool:
        procs = [self.gateway, self.worker, *([self.model_server] if self.models else [])]
        return all(p is not None and p.poll() is None for p in procs)

    def stop(self, *, grace: float = 30.0, cold: bool = False) -> None:
        """Workers first (warm stop, finishing their jobs), then the gateway."""
        stop_process(self.model_server, grace, cold=cold)
        stop_process(self.worker, grace, cold=cold)
        stop_process(self.gateway, grace)
        for handle in self._files:
            handle.close()
        self._files.clear()

    def log_paths(self) -> list[Path]:
        names = ["gateway", "worker", *(["model-server"] if self.models else [])]
        return [self.logs / f"{name}.log" for name in names]
