"""Run Compose for one project: build, up (and wait for health), ps, logs, down; v2 and v1.

:class:`Compose` takes the command :func:`hostgpu.stack.docker.check_docker` chose
(``docker compose`` or ``docker-compose``), the compose file, a project name and the
environment the file interpolates (passed through the environment, never the command line:
it may hold passwords). Containers are found by the ``com.docker.compose.project`` label
that both Compose versions set, and read with ``docker inspect``, so ``ps`` and the health
wait work the same on v1 (no ``ps --format json``, no ``up --wait``) and v2.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hostgpu.errors import HostGPUError
from hostgpu.stack.docker import ComposeInfo

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class ComposeError(HostGPUError):
    """A Compose command failed; the message carries its output."""


@dataclass
class Container:
    """One container of the project, as ``docker inspect`` sees it."""

    id: str
    name: str
    service: str
    image: str
    state: str  # created, running, restarting, exited, …
    health: str | None  # healthy, unhealthy, starting; None without a health check
    exit_code: int | None
    ports: list[str] = field(default_factory=list)  # "127.0.0.1:8765->8000/tcp"
    started_at: str | None = None

    @property
    def ready(self) -> bool:
        """Running, and healthy when it has a health check."""
        return self.state == "running" and self.health in (None, "healthy")

    @classmethod
    def from_inspect(cls, data: Mapping[str, Any]) -> Container:
        state = data.get("State") or {}
        config = data.get("Config") or {}
        labels = config.get("Labels") or {}
        health = (state.get("Health") or {}).get("Status")
        ports = []
        for port, bindings in sorted(
            ((data.get("NetworkSettings") or {}).get("Ports") or {}).items()
        ):
            for binding in bindings or []:
                ports.append(
                    f"{binding.get('HostIp') or '0.0.0.0'}:{binding.get('HostPort')}->{port}"
                )
        return cls(
            id=str(data.get("Id", ""))[:12],
            name=str(data.get("Name", "")).lstrip("/"),
            service=str(labels.get(SERVICE_LABEL, "")),
            image=str(config.get("Image", "")),
            state=str(state.get("Status", "unknown")),
            health=str(health) if health else None,
            exit_code=state.get("ExitCode"),
            ports=ports,
            started_at=state.get("StartedAt"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "name": self.name,
            "image": self.image,
            "state": self.state,
            "health": self.health,
            "exit_code": self.exit_code,
            "ports": self.ports,
        }


class Compose:
    """One compose project (file, name, profiles, environment) and the commands on it."""

    def __init__(
        self,
        info: ComposeInfo,
        files: Sequence[Path],
        project: str,
        *,
        env: Mapping[str, str] | None = None,
        profiles: Sequence[str] = (),
    ) -> None:
        self.info = info
        self.files = [Path(f) for f in files]
        self.project = project
        self.env = {**os.environ, **(env or {})}
        self.profiles = list(profiles)

    # -- running --------------------------------------------------------------------------
    def argv(self, *args: str, profiles: Sequence[str] | None = None) -> list[str]:
        base = [*self.info.command]
        for path in self.files:
            base += ["-f", str(path)]
        base += ["-p", self.project]
        for profile in self.profiles if profiles is None else profiles:
            base += ["--profile", profile]
        return [*base, *args]

    def run(
        self,
        *args: str,
        timeout: float | None = None,
        capture: bool = True,
        check: bool = True,
        profiles: Sequence[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*args, profiles=profiles)
        try:
            done = subprocess.run(
                argv,
                env=self.env,
                capture_output=capture,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ComposeError(
                f"`{' '.join(argv[:2])} {' '.join(args)}` took longer than {timeout:.0f} s"
            ) from exc
        if check and done.returncode != 0:
            output = "\n".join(
                line for line in ((done.stdout or "") + (done.stderr or "")).splitlines()[-40:]
            )
            raise ComposeError(
                f"`{' '.join(self.info.command)} {' '.join(args)}` failed "
                f"(exit {done.returncode}):\n{output}"
            )
        return done

    def docker(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    # -- commands -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the file and the environment it interpolates (raises ComposeError)."""
        self.run("config", "-q", timeout=60)

    def build(self, services: Iterable[str] = (), *, timeout: float = 1800) -> None:
        services = list(services)
        if services:
            self.run("build", *services, timeout=timeout, capture=True)

    def up(self, services: Iterable[str] = (), *, timeout: float = 300) -> list[Container]:
        """Create and start the services without building, then wait until all are ready.

        Compose v2 waits itself (``up --wait``); v1 has no ``--wait``, so the health of each
        container is polled through ``docker inspect`` instead. Either way a container that
        exits or turns unhealthy fails the call with its last log lines.
        """
        services = list(services)
        args = ["up", "-d", "--no-build", "--remove-orphans"]
        if self.info.supports_wait:
            args += ["--wait"]
        try:
            self.run(*args, *services, timeout=timeout + 30)
        except ComposeError as exc:
            raise ComposeError(f"{exc}\n{self.problem_logs()}") from None
        return self.wait_ready(services, timeout=timeout)

    def wait_ready(self, services: Sequence[str] = (), *, timeout: float = 300) -> list[Container]:
        deadline = time.monotonic() + timeout
        while True:
            containers = self.containers()
            wanted = [c for c in containers if not services or c.service in services]
            missing = set(services) - {c.service for c in wanted}
            failed = [c for c in wanted if c.state in ("exited", "dead") or c.health == "unhealthy"]
            if failed:
                names = ", ".join(f"{c.service} ({c.health or c.state})" for c in failed)
                raise ComposeError(f"not healthy: {names}\n{self.problem_logs(failed)}")
            if wanted and not missing and all(c.ready for c in wanted):
                return wanted
            if time.monotonic() > deadline:
                waiting = (
                    ", ".join(f"{c.service} ({c.health or c.state})" for c in wanted if not c.ready)
                    or ", ".join(sorted(missing))
                    or "no containers"
                )
                raise ComposeError(
                    f"still not healthy after {timeout:.0f} s: {waiting}\n{self.problem_logs()}"
                )
            time.sleep(1.0)

    def container_ids(self) -> list[str]:
        done = self.docker(
            "ps", "-a", "-q", "--no-trunc", "--filter", f"label={PROJECT_LABEL}={self.project}"
        )
        if done.returncode != 0:
            raise ComposeError(f"docker ps failed: {done.stderr.strip()}")
        return done.stdout.split()

    def containers(self) -> list[Container]:
        """Every container of the project (stopped ones too), sorted by service."""
        ids = self.container_ids()
        if not ids:
            return []
        done = self.docker("inspect", *ids)
        if done.returncode != 0:
            # A container removed between ps and inspect: read the ones that remain.
            return [c for i in ids for c in self._inspect_one(i)]
        return sorted(
            (Container.from_inspect(d) for d in json.loads(done.stdout)), key=lambda c: c.service
        )

    def _inspect_one(self, container_id: str) -> list[Container]:
        done = self.docker("inspect", container_id)
        if done.returncode != 0:
            return []
        return [Container.from_inspect(d) for d in json.loads(done.stdout)]

    def logs(self, services: Sequence[str] = (), *, tail: int | None = 200) -> str:
        args = ["logs", "--no-color"]
        if tail is not None:
            args += ["--tail", str(tail)]
        done = self.run(*args, *services, timeout=60, check=False)
        return (done.stdout or "") + (done.stderr or "")

    def follow_logs(self, services: Sequence[str] = (), *, tail: int = 50) -> int:
        """Stream logs to this terminal until interrupted."""
        argv = self.argv("logs", "--follow", "--tail", str(tail), *services)
        return subprocess.call(argv, env=self.env)

    def problem_logs(self, containers: Sequence[Container] | None = None, tail: int = 30) -> str:
        """The last log lines of the containers that are not ready (all, if none is given)."""
        try:
            chosen = containers if containers is not None else self.containers()
        except (ComposeError, OSError, ValueError):
            return ""
        parts = []
        for container in chosen:
            if containers is None and container.ready:
                continue
            done = self.docker("logs", "--tail", str(tail), container.id, timeout=30)
            text = (done.stdout + done.stderr).strip()
            parts.append(
                f"--- {container.service} ({container.health or container.state}) ---\n{text}"
            )
        return "\n".join(parts)

    def down(
        self, *, volumes: bool = False, timeout: float = 180, profiles: Sequence[str] = ()
    ) -> None:
        """Stop and remove every container of the project (all profiles named), and its network."""
        args = ["down", "--remove-orphans", "-t", "10"]
        if volumes:
            args.append("--volumes")
        self.run(*args, timeout=timeout, profiles=[*self.profiles, *profiles])


__all__ = ["PROJECT_LABEL", "SERVICE_LABEL", "Compose", "ComposeError", "Container"]
