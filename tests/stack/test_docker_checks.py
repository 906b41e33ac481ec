"""Docker checks as data: recorded `docker info`/`docker version` outputs of engines that
cannot run here (Docker Desktop, OrbStack, Colima, Rancher Desktop, Podman), the real
outputs of this machine's engine and of a missing daemon, and one check of the real engine.
See recorded/README.md for where each recorded output comes from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from hostgpu.stack.docker import (
    DockerReport,
    Result,
    check_docker,
    choose_compose,
    container_check,
    daemon_problem,
    engine_kind,
    version_tuple,
)

RECORDED = Path(__file__).parent / "recorded"


def recorded(name: str) -> dict[str, Any]:
    return json.loads((RECORDED / name).read_text())


class Recorded:
    """Answers the CLI calls check_docker makes from one recorded engine (the narrow seam)."""

    def __init__(
        self,
        data: dict[str, Any] | None,
        *,
        plugin: str | None = "2.29.7",
        standalone: str | None = None,
        client: bool = True,
    ) -> None:
        self.data, self.plugin, self.standalone, self.client = data, plugin, standalone, client
        self.calls: list[list[str]] = []

    def __call__(self, args: Sequence[str], timeout: float) -> Result:
        args = list(args)
        self.calls.append(args)
        if args[0] == "docker" and not self.client:
            return Result(127, "", "No such file or directory: 'docker'")
        if args[:2] == ["docker", "version"]:
            if self.data and "version_cli" in self.data:
                return Result(**self.data["version_cli"])
            return Result(0, json.dumps(self.data["version"]) if self.data else "", "")
        if args[:2] == ["docker", "info"]:
            if self.data and "info_cli" in self.data:
                return Result(**self.data["info_cli"])
            return Result(0, json.dumps(self.data["info"]) if self.data else "", "")
        if args[:2] == ["docker", "context"]:
            return Result(0, (self.data or {}).get("docker_host") or "", "")
        if args[:2] == ["docker", "compose"]:
            return Result(0, self.plugin + "\n", "") if self.plugin else Result(1, "", "unknown")
        if args[0] == "docker-compose":
            if self.standalone:
                return Result(0, self.standalone + "\n", "")
            return Result(127, "", "No such file or directory: 'docker-compose'")
        raise AssertionError(f"unexpected call {args}")


def check(
    runner: Recorded,
    *,
    system: str = "Darwin",
    env: dict[str, str] | None = None,
    where: tuple[str | None, str | None] = (None, None),
) -> DockerReport:
    return check_docker(
        runner,
        env=env or {"PATH": "/usr/bin"},
        system=system,
        where=where,
        home=Path("/nonexistent-home"),
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("debian-docker-engine.json", "Docker Engine"),
        ("docker-desktop-mac.json", "Docker Desktop"),
        ("docker-desktop-windows.json", "Docker Desktop"),
        ("orbstack.json", "OrbStack"),
        ("orbstack-2023.json", "OrbStack"),
        ("colima.json", "Colima"),
        ("rancher-desktop.json", "Rancher Desktop"),
        ("podman-machine.json", "Podman"),
        ("rootless-docker-linux.json", "Docker Engine"),
    ],
)
def test_engine_kind_from_recorded_outputs(name: str, kind: str) -> None:
    data = recorded(name)
    assert engine_kind(data["info"], data["version"], data["docker_host"] or "") == kind
    report = check(Recorded(data))
    assert report.ok, report.checks
    assert report.engine == kind
    assert report.server_version == data["info"]["ServerVersion"]
    daemon = report.check("daemon")
    assert daemon is not None and kind in daemon.detail


def test_rootless_is_reported() -> None:
    report = check(Recorded(recorded("rootless-docker-linux.json")), system="Linux")
    assert report.rootless
    assert "(rootless)" in (report.check("daemon") or pytest.fail()).detail
    assert not check(Recorded(recorded("colima.json"))).rootless


def test_context_endpoint_is_read_when_docker_host_is_unset() -> None:
    data = recorded("colima.json")
    report = check(Recorded(data))
    assert report.context == "colima"
    assert report.docker_host == data["docker_host"]


def test_missing_client_says_how_to_install_per_platform() -> None:
    mac = check(Recorded(None, client=False), system="Darwin")
    assert not mac.ok
    client = mac.check("client")
    assert client is not None and not client.ok
    assert "OrbStack" in (client.fix or "") and "Colima" in (client.fix or "")
    linux = check(Recorded(None, client=False), system="Linux")
    assert "docs.docker.com/engine/install" in (linux.check("client") or pytest.fail()).fix
    # Nothing else is asked of a CLI that is not there.
    assert [c.name for c in linux.checks] == ["client", "daemon", "compose", "container"]


def test_daemon_down_recorded_here() -> None:
    """The real output of this machine's CLI with no daemon on the default socket."""
    report = check(Recorded(recorded("debian-daemon-down.json")), system="Linux")
    assert not report.ok
    daemon = report.check("daemon")
    assert daemon is not None and not daemon.ok
    assert "Cannot connect to the Docker daemon" in (daemon.reason or "")
    assert "systemctl start docker" in (daemon.fix or "")
    client = report.check("client")
    assert client is not None and client.ok and "28.2.2" in client.detail


def test_daemon_problems_name_the_fix() -> None:
    denied = (
        "permission denied while trying to connect to the Docker daemon socket at "
        'unix:///var/run/docker.sock: Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.24/info": '
        "dial unix /var/run/docker.sock: connect: permission denied"
    )
    reason, fix = daemon_problem(denied, system="Linux", docker_host=None)
    assert "not allowed" in reason and "usermod -aG docker" in fix
    reason, fix = daemon_problem("connection refused", system="Linux", docker_host="tcp://h:2375")
    assert "DOCKER_HOST=tcp://h:2375" in reason and "unset DOCKER_HOST" in fix
    reason, fix = daemon_problem("Cannot connect", system="Darwin", docker_host=None)
    assert "open -a Docker" in fix and "colima start" in fix


def test_a_socket_that_exists_is_suggested(tmp_path: Path) -> None:
    sock = tmp_path / ".colima/default/docker.sock"
    sock.parent.mkdir(parents=True)
    sock.touch()
    reason, fix = daemon_problem(
        "Cannot connect", system="Darwin", docker_host=None, sockets=[sock]
    )
    assert str(sock) in reason and f"DOCKER_HOST=unix://{sock}" in fix


def test_compose_choice_v2_v1_and_missing() -> None:
    v2 = choose_compose("2.26.1-4", None, False, None)
    assert v2 is not None and v2.command == ["docker", "compose"] and v2.supports_wait
    old_v2 = choose_compose("2.0.1", None, False, None)
    assert old_v2 is not None and not old_v2.supports_wait
    v1 = choose_compose(None, "1.29.2", False, None)
    assert v1 is not None and v1.v1 and v1.command == ["docker-compose"] and not v1.supports_wait
    standalone_v2 = choose_compose(None, "2.24.0", True, None)
    assert standalone_v2 is not None and not standalone_v2.v1 and standalone_v2.supports_wait
    assert choose_compose("2.26.1", "1.29.2", False, "v1") == v1
    assert choose_compose("2.26.1", None, False, "v1") is None
    assert choose_compose(None, None, False, None) is None


def test_missing_compose_fails_with_a_fix() -> None:
    report = check(Recorded(recorded("colima.json"), plugin=None), system="Darwin")
    compose = report.check("compose")
    assert compose is not None and not compose.ok and not report.ok
    assert "brew install docker-compose" in (compose.fix or "")
    asked = check(
        Recorded(recorded("debian-docker-engine.json")),
        system="Linux",
        env={"PATH": "/usr/bin", "HOSTGPU_COMPOSE": "v1"},
    )
    v1 = asked.check("compose")
    assert v1 is not None and not v1.ok and "HOSTGPU_COMPOSE=v1" in (v1.reason or "")
    with_v1 = check(
        Recorded(recorded("debian-docker-engine.json"), standalone="1.29.2"),
        system="Linux",
        env={"PATH": "/usr/bin", "HOSTGPU_COMPOSE": "v1"},
    )
    assert with_v1.ok and with_v1.compose is not None and with_v1.compose.v1


def test_where_this_process_runs() -> None:
    native = container_check(None, None)
    assert native.ok and not native.required
    here = container_check("docker", None)  # a Linux container (this CI machine is one)
    assert here.ok and "docker container" in here.detail
    mac_vm = container_check("docker", "Docker Desktop")
    assert not mac_vm.ok and "Metal" in (mac_vm.reason or "")
    assert "natively on the Mac" in (mac_vm.fix or "")
    report = check(
        Recorded(recorded("docker-desktop-mac.json")), where=("docker", "Docker Desktop")
    )
    assert not report.ok and report.vm_on_macos


def test_version_tuple() -> None:
    assert version_tuple("v2.26.1-desktop.1") == (2, 26, 1)
    assert version_tuple("1.29.2") == (1, 29, 2)
    assert version_tuple("") == ()


@pytest.mark.docker
def test_the_real_engine(docker_engine: DockerReport) -> None:
    """This machine's engine, through the real CLI."""
    assert docker_engine.client_version and docker_engine.server_version
    assert docker_engine.engine is not None
    assert docker_engine.compose is not None and docker_engine.compose.version
    names = [c.name for c in docker_engine.checks]
    assert names == ["client", "daemon", "compose", "container"]


def test_doctor_shows_a_docker_section(tmp_path: Path) -> None:
    """A real `hostgpu doctor` process: the docker report next to the accelerator report."""
    import os
    import subprocess

    from hostgpu.processes import hostgpu_command

    env = {**os.environ, "HOSTGPU_HOME": str(tmp_path), "COLUMNS": "200"}
    out = subprocess.run(
        hostgpu_command("doctor", "--json"), env=env, capture_output=True, text=True, check=True
    )
    report = json.loads(out.stdout)
    assert report["devices"][-1]["kind"] == "cpu"  # the accelerator report is unchanged
    docker = DockerReport.model_validate(report["docker"])
    assert [c.name for c in docker.checks] == ["client", "daemon", "compose", "container"]
    assert all(c.ok or (c.reason and c.fix) for c in docker.checks if c.required)
    bare = subprocess.run(
        hostgpu_command("doctor", "--json", "--no-docker"),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "docker" not in json.loads(bare.stdout)
    table = subprocess.run(
        hostgpu_command("doctor"), env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "Docker (for `hostgpu stack`)" in table and "compose" in table
