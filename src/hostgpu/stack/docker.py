"""Docker checks as data: client, daemon, Compose, engine kind, and where this process runs.

:func:`check_docker` runs the Docker CLI (``docker version``, ``docker info``, ``docker
compose version``, ``docker-compose version``) and returns a :class:`DockerReport`: the
facts, plus one :class:`DockerCheck` per question, each failing one with one line of reason
and one line of fix. ``hostgpu doctor`` shows it; ``hostgpu stack up`` refuses to start
until the required checks pass.

The engine kind comes from ``docker info`` the way other tools read it (ddev's
``dockerutil``): ``OperatingSystem`` ("Docker Desktop", "OrbStack…", "Rancher Desktop…"),
``Name`` ("colima…", "lima-rancher-desktop", "lima…"), the server's components ("Podman
Engine"), ``SecurityOptions`` ("name=rootless"), with the kernel release (``linuxkit``,
``orbstack``) and the socket path as fallbacks. Everything that reads the outputs is a
plain function of them, so tests feed it recorded outputs of engines that cannot run here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from hostgpu.devices import HostFacts, detect_container, detect_macos_vm
from hostgpu.devices.facts import assume_container

EngineKind = Literal[
    "Docker Desktop",
    "OrbStack",
    "Colima",
    "Rancher Desktop",
    "Lima",
    "Podman",
    "Docker Engine",
]

#: Compose v2 learned ``up --wait`` in 2.1.1; older releases (and v1) are polled instead.
WAIT_SINCE = (2, 1, 1)


@dataclass(frozen=True)
class Result:
    """What one CLI call returned (``returncode`` 127: not found, 124: timed out)."""

    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[Sequence[str], float], Result]


def run_cli(args: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> Result:
    """Run a CLI command, never raising: a missing binary or a timeout is a Result too."""
    try:
        done = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        return Result(127, "", str(exc))
    except subprocess.TimeoutExpired:
        return Result(124, "", f"{' '.join(args)} did not answer within {timeout:.0f} s")
    return Result(done.returncode, done.stdout, done.stderr)


class DockerCheck(BaseModel):
    """One question about Docker, answered: ``ok``, what was found, and if not, why and how."""

    name: str
    ok: bool
    detail: str = ""
    reason: str | None = None
    fix: str | None = None
    required: bool = True  # False: worth knowing, never blocks `hostgpu stack up`


class ComposeInfo(BaseModel):
    """The Compose to use: its command prefix, version and what it supports."""

    command: list[str]
    version: str
    v1: bool
    supports_wait: bool


class DockerReport(BaseModel):
    """Everything :func:`check_docker` found out, and the checks drawn from it."""

    client: str | None = None  # path of the docker binary
    client_version: str | None = None
    server_version: str | None = None
    docker_host: str | None = None  # the endpoint the CLI talks to
    context: str | None = None
    engine: EngineKind | None = None
    engine_os: str | None = None
    kernel: str | None = None
    rootless: bool = False
    compose: ComposeInfo | None = None
    compose_v2: str | None = None
    compose_v1: str | None = None
    in_container: str | None = None  # this process's container runtime, if any
    vm_on_macos: bool = False
    checks: list[DockerCheck] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every required check passed: `hostgpu stack up` can go ahead."""
        return all(c.ok for c in self.checks if c.required)

    def failures(self) -> list[DockerCheck]:
        return [c for c in self.checks if not c.ok]

    def check(self, name: str) -> DockerCheck | None:
        return next((c for c in self.checks if c.name == name), None)


# --------------------------------------------------------------------------- parsing


def version_tuple(text: str) -> tuple[int, ...]:
    """'v2.26.1-desktop.1' → (2, 26, 1); '' → ()."""
    match = re.search(r"(\d+(?:\.\d+)*)", text or "")
    return tuple(int(p) for p in match.group(1).split(".")) if match else ()


def _json(text: str) -> dict[str, Any] | None:
    """The JSON object in a CLI's output (``--format '{{json .}}'`` prints one line)."""
    for candidate in ((text or "").strip(), *(text or "").splitlines()):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def engine_kind(
    info: Mapping[str, Any], version: Mapping[str, Any] | None = None, docker_host: str = ""
) -> EngineKind:
    """Which engine answers, from ``docker info`` (and ``docker version``) as JSON."""
    name = str(info.get("Name") or "").lower()
    os_name = str(info.get("OperatingSystem") or "")
    kernel = str(info.get("KernelVersion") or "").lower()
    host = docker_host.lower()
    server = (version or {}).get("Server") or {}
    components = [str(c.get("Name") or "") for c in server.get("Components") or []]
    # Podman's own `podman info` layout (a `docker` shim that is really podman).
    if any(c.startswith("Podman Engine") for c in components) or (
        "host" in info and "store" in info
    ):
        return "Podman"
    if "podman" in host:
        return "Podman"
    if os_name.startswith("OrbStack") or "orbstack" in name or "orbstack" in kernel:
        return "OrbStack"
    if os_name.startswith("Rancher Desktop") or "rancher-desktop" in name or "/.rd/" in host:
        return "Rancher Desktop"
    if name.startswith("colima") or "/.colima/" in host:
        return "Colima"
    if name.startswith("lima") or "/.lima/" in host:
        return "Lima"
    if os_name == "Docker Desktop" or "linuxkit" in kernel or name == "docker-desktop":
        return "Docker Desktop"
    return "Docker Engine"


def rootless(info: Mapping[str, Any]) -> bool:
    return any("rootless" in str(opt) for opt in info.get("SecurityOptions") or [])


# --------------------------------------------------------------------------- fixes


def _macos(system: str) -> bool:
    return system == "Darwin"


def _client_fix(system: str) -> str:
    if _macos(system):
        return (
            "install an engine with its CLI: Docker Desktop (https://docs.docker.com/desktop/), "
            "OrbStack (brew install orbstack) or Colima (brew install colima docker "
            "docker-compose && colima start)"
        )
    if system == "Windows":
        return "install Docker Desktop (https://docs.docker.com/desktop/) with the WSL 2 backend"
    return (
        "install Docker Engine and Compose (https://docs.docker.com/engine/install/; Debian/"
        "Ubuntu: sudo apt-get install docker.io docker-compose-v2)"
    )


def _default_sockets(home: Path) -> list[Path]:
    """Where the common engines put their socket when no context points at it."""
    return [
        Path("/var/run/docker.sock"),
        home / ".docker/run/docker.sock",  # Docker Desktop
        home / ".orbstack/run/docker.sock",
        home / ".colima/default/docker.sock",
        home / ".rd/docker.sock",  # Rancher Desktop
        home / ".lima/default/sock/docker.sock",
        Path(f"/run/user/{os.getuid()}/docker.sock") if hasattr(os, "getuid") else home,
        Path(f"/run/user/{os.getuid()}/podman/podman.sock") if hasattr(os, "getuid") else home,
    ]


def daemon_problem(
    stderr: str, *, system: str, docker_host: str | None, sockets: Sequence[Path] = ()
) -> tuple[str, str]:
    """(reason, fix) for a daemon the CLI could not reach, from its error text."""
    text = " ".join((stderr or "").split())
    first = text[:300] or "no answer from the Docker daemon"
    where = f"DOCKER_HOST={docker_host}" if docker_host else "the default socket"
    if "permission denied" in text.lower():
        return (
            f"not allowed to use {where}: {first}",
            "add yourself to the docker group (sudo usermod -aG docker $USER), then log out "
            "and in again; or use rootless Docker",
        )
    if docker_host:
        return (
            f"nothing answers at DOCKER_HOST={docker_host}: {first}",
            "start the engine that owns that socket, or unset DOCKER_HOST to use the "
            "current docker context",
        )
    existing = [s for s in sockets if s.exists()]
    if existing:
        return (
            f"the CLI's endpoint does not answer, but {existing[0]} exists: {first}",
            f"export DOCKER_HOST=unix://{existing[0]} (or `docker context use` the engine "
            "that owns it)",
        )
    if _macos(system):
        return (
            f"no Docker engine is running: {first}",
            "start one: open -a Docker (Docker Desktop), orb start (OrbStack), colima start, "
            "or open Rancher Desktop",
        )
    return (
        f"no Docker daemon answers: {first}",
        "start it: sudo systemctl start docker (or `systemctl --user start docker` for "
        "rootless Docker)",
    )


def _compose_fix(system: str, engine: str | None, want: str | None) -> str:
    if want == "v1":
        return (
            "install docker-compose 1.29 (pip install docker-compose, or apt-get install "
            "docker-compose), or unset HOSTGPU_COMPOSE to use Compose v2"
        )
    if _macos(system):
        if engine in ("Colima", "Lima", "Podman"):
            return (
                "brew install docker-compose, then link it as a CLI plugin (see `brew info "
                "docker-compose`)"
            )
        return (
            "Docker Desktop, OrbStack and Rancher Desktop ship Compose: update or reinstall "
            "the engine (or brew install docker-compose)"
        )
    return (
        "install Compose v2: sudo apt-get install docker-compose-plugin (Docker's apt "
        "repository) or docker-compose-v2 (Ubuntu), or download it from "
        "https://github.com/docker/compose/releases to ~/.docker/cli-plugins/docker-compose"
    )


# --------------------------------------------------------------------------- the checks


def _where_am_i(root: Path = Path("/")) -> tuple[str | None, str | None]:
    """(container runtime, macOS VM) of this process, read like the accelerator probe does.

    Builds :class:`HostFacts` with only what container detection reads: no torch import.
    """

    def read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    facts = HostFacts(
        system=platform.system(),
        machine=platform.machine(),
        kernel_release=platform.release(),
        dockerenv=(root / ".dockerenv").exists(),
        containerenv=(root / "run/.containerenv").exists(),
        cgroup=read(root / "proc/1/cgroup"),
        mounts=read(root / "proc/mounts"),
        assume_container=assume_container(),
    )
    container, vm = detect_container(facts), detect_macos_vm(facts)
    if vm and container is None:
        container = "docker" if vm == "Docker Desktop" else "container"
    return container, vm


def container_check(container: str | None, vm: str | None) -> DockerCheck:
    """Where this process runs: native is best; a container on a macOS VM cannot reach Metal."""
    if vm:
        return DockerCheck(
            name="container",
            ok=False,
            detail=f"in a {container or 'container'} container inside {vm}'s Linux VM",
            reason=f"inside {vm}'s Linux VM: a worker started here cannot reach Metal",
            fix="run `hostgpu stack up` (and `hostgpu worker`) natively on the Mac, not in a "
            "container; --allow-container overrides",
        )
    if container:
        return DockerCheck(
            name="container",
            ok=True,
            required=False,
            detail=f"this process runs in a {container} container (so would a worker "
            "started from it)",
        )
    return DockerCheck(name="container", ok=True, required=False, detail="native (no container)")


def _compose_versions(runner: Runner) -> tuple[str | None, str | None, bool]:
    """(docker compose plugin version, docker-compose version, docker-compose is v2)."""
    v2 = runner(["docker", "compose", "version", "--short"], 15)
    plugin = v2.stdout.strip() if v2.returncode == 0 and v2.stdout.strip() else None
    standalone: str | None = None
    standalone_v2 = False
    v1 = runner(["docker-compose", "version", "--short"], 30)  # 127 when not installed
    if v1.returncode == 0 and v1.stdout.strip():
        standalone = v1.stdout.strip()
        standalone_v2 = version_tuple(standalone)[:1] >= (2,)
    return plugin, standalone, standalone_v2


def choose_compose(
    plugin: str | None, standalone: str | None, standalone_v2: bool, want: str | None
) -> ComposeInfo | None:
    """The Compose to use; ``want`` ('v1'/'v2', from HOSTGPU_COMPOSE) narrows the choice."""
    options: list[ComposeInfo] = []
    if plugin:
        options.append(
            ComposeInfo(
                command=["docker", "compose"],
                version=plugin,
                v1=False,
                supports_wait=version_tuple(plugin) >= WAIT_SINCE,
            )
        )
    if standalone:
        options.append(
            ComposeInfo(
                command=["docker-compose"],
                version=standalone,
                v1=not standalone_v2,
                supports_wait=standalone_v2 and version_tuple(standalone) >= WAIT_SINCE,
            )
        )
    if want == "v1":
        options = [o for o in options if o.v1]
    elif want == "v2":
        options = [o for o in options if not o.v1]
    return options[0] if options else None


def check_docker(
    runner: Runner | None = None,
    *,
    env: Mapping[str, str] | None = None,
    system: str | None = None,
    where: tuple[str | None, str | None] | None = None,
    home: Path | None = None,
) -> DockerReport:
    """Ask the Docker CLI what it can reach; every answer becomes a fact and a check."""
    environ = dict(os.environ if env is None else env)
    run: Runner = runner or (lambda args, timeout: run_cli(args, timeout, environ))
    system = system or platform.system()
    container, vm = where if where is not None else _where_am_i()
    docker_host = environ.get("DOCKER_HOST") or None
    want = (environ.get("HOSTGPU_COMPOSE") or "").strip().lower() or None
    if want not in (None, "v1", "v2", "auto"):
        want = None
    report = DockerReport(
        client=shutil.which("docker", path=environ.get("PATH")),
        docker_host=docker_host,
        in_container=container,
        vm_on_macos=vm is not None,
    )
    checks = report.checks

    # 1. The client.
    version_out = run(["docker", "version", "--format", "{{json .}}"], 20)
    if version_out.returncode == 127:
        checks.append(
            DockerCheck(
                name="client",
                ok=False,
                detail="not found",
                reason="the `docker` command is not on PATH",
                fix=_client_fix(system),
            )
        )
        checks.append(DockerCheck(name="daemon", ok=False, detail="not checked (no client)"))
        checks.append(DockerCheck(name="compose", ok=False, detail="not checked (no client)"))
        checks.append(container_check(container, vm))
        return report
    version = _json(version_out.stdout) or {}
    client = version.get("Client") or {}
    report.client_version = str(client.get("Version") or "") or None
    report.context = str(client.get("Context") or "") or None
    checks.append(
        DockerCheck(
            name="client",
            ok=True,
            detail=f"docker {report.client_version or '(version unknown)'}"
            + (f", context {report.context}" if report.context else ""),
        )
    )
    if docker_host is None and report.context:
        endpoint = run(
            ["docker", "context", "inspect", "--format", "{{.Endpoints.docker.Host}}"], 10
        )
        if endpoint.returncode == 0 and endpoint.stdout.strip():
            report.docker_host = endpoint.stdout.strip()

    # 2. The daemon.
    info_out = run(["docker", "info", "--format", "{{json .}}"], 30)
    info = _json(info_out.stdout) or {}
    server_errors = info.get("ServerErrors") or []
    if (
        info_out.returncode != 0
        or server_errors
        or not (info.get("ServerVersion") or info.get("host"))
    ):
        error = "; ".join(str(e) for e in server_errors) or info_out.stderr or version_out.stderr
        reason, fix = daemon_problem(
            error,
            system=system,
            docker_host=docker_host,
            sockets=_default_sockets(home or Path.home()),
        )
        checks.append(
            DockerCheck(name="daemon", ok=False, detail="unreachable", reason=reason, fix=fix)
        )
    else:
        report.server_version = (
            str(info.get("ServerVersion") or (info.get("version") or {}).get("Version") or "")
            or None
        )
        report.engine = engine_kind(info, version, report.docker_host or "")
        report.engine_os = str(info.get("OperatingSystem") or "") or None
        report.kernel = str(info.get("KernelVersion") or "") or None
        report.rootless = rootless(info)
        detail = f"{report.engine} {report.server_version or ''}".strip()
        if report.rootless:
            detail += " (rootless)"
        checks.append(
            DockerCheck(
                name="daemon",
                ok=True,
                detail=f"{detail} at {report.docker_host or 'the default socket'}",
            )
        )

    # 3. Compose.
    plugin, standalone, standalone_v2 = _compose_versions(run)
    report.compose_v2 = plugin or (standalone if standalone_v2 else None)
    report.compose_v1 = standalone if standalone and not standalone_v2 else None
    report.compose = choose_compose(plugin, standalone, standalone_v2, want)
    if report.compose is None:
        found = ", ".join(
            f"{name} {v}" for name, v in (("v2", report.compose_v2), ("v1", report.compose_v1)) if v
        )
        asked = f" (HOSTGPU_COMPOSE={want})" if want in ("v1", "v2") else ""
        checks.append(
            DockerCheck(
                name="compose",
                ok=False,
                detail=f"found: {found}" if found else "not found",
                reason=f"neither `docker compose` (v2) nor `docker-compose` answers{asked}"
                if not found
                else f"the Compose asked for{asked} is not installed",
                fix=_compose_fix(system, report.engine, want),
            )
        )
    else:
        compose = report.compose
        checks.append(
            DockerCheck(
                name="compose",
                ok=True,
                detail=f"{' '.join(compose.command)} {compose.version}"
                + (" (v1: health is polled, no --wait)" if compose.v1 else ""),
            )
        )

    # 4. Where this process runs.
    checks.append(container_check(container, vm))
    return report


def explain(report: DockerReport) -> str:
    """The failing checks as text: one line of reason and one of fix each."""
    lines = []
    for failed in report.failures():
        if failed.reason is None:
            continue
        lines.append(f"✗ docker {failed.name}: {failed.reason}")
        if failed.fix:
            lines.append(f"  fix: {failed.fix}")
    return "\n".join(lines)


__all__ = [
    "ComposeInfo",
    "DockerCheck",
    "DockerReport",
    "Result",
    "Runner",
    "check_docker",
    "choose_compose",
    "container_check",
    "daemon_problem",
    "engine_kind",
    "explain",
    "run_cli",
    "version_tuple",
]
