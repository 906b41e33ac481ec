"""The stack's own decisions, without an engine: secrets, state, compose environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostgpu.settings import Settings
from hostgpu.stack.compose import Container
from hostgpu.stack.docker import ComposeInfo
from hostgpu.stack.hybrid import (
    HybridStack,
    StackError,
    StackState,
    default_project,
    find_compose_file,
)
from tests.conftest import ROOT

V2 = ComposeInfo(command=["docker", "compose"], version="2.26.1", v1=False, supports_wait=True)


def stack(home: Path, notes: list[str] | None = None) -> HybridStack:
    said = notes if notes is not None else []
    return HybridStack(Settings(home=home), say=said.append)


def state(home: Path, **kw: object) -> StackState:
    values: dict[str, object] = {
        "project": "p",
        "compose_file": str(ROOT / "deploy/hybrid/compose.yaml"),
        "compose": V2,
        "uploads": str(home / "inbox"),
        **kw,
    }
    return StackState.model_validate(values)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_admin_secret_is_made_once_and_kept_private(home: Path) -> None:
    s = stack(home)
    secret = s.admin_secret()
    assert secret.startswith("hga_") and len(secret) > 40
    assert s.admin_secret() == secret
    assert (home / "stack/gateway/admin-token").read_text().strip() == secret
    assert (home / "admin-token").read_text().strip() == secret  # written when missing
    assert mode(home / "stack/gateway/admin-token") == 0o600
    assert mode(home / "admin-token") == 0o600
    assert mode(home / "stack") == 0o700 and mode(home / "stack/gateway") == 0o700


def test_an_existing_admin_token_of_this_home_is_reused(home: Path) -> None:
    (home / "admin-token").write_text("hga_from_a_local_gateway_" + "x" * 20 + "\n")
    assert stack(home).admin_secret() == "hga_from_a_local_gateway_" + "x" * 20


def test_another_gateways_token_is_never_overwritten(home: Path) -> None:
    notes: list[str] = []
    first = stack(home).admin_secret()
    (home / "admin-token").write_text("hga_another_gateway\n")
    assert stack(home, notes).admin_secret() == first
    assert (home / "admin-token").read_text() == "hga_another_gateway\n"
    assert any("another gateway" in n for n in notes)


def test_copyparty_config_names_the_folder_and_account(home: Path, tmp_path: Path) -> None:
    s = stack(home)
    s.write_copyparty_config(tmp_path / "inbox")
    config = (home / "stack/uploads/copyparty.conf").read_text()
    password = (home / "uploads-password").read_text().strip()
    assert f"hostgpu: {password}" in config and str(tmp_path / "inbox") in config
    assert mode(home / "stack/uploads/copyparty.conf") == 0o600
    with pytest.raises(StackError):
        s.write_copyparty_config(tmp_path / "bad\nname")


def test_compose_environment(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTGPU_UID", raising=False)
    monkeypatch.delenv("HOSTGPU_GID", raising=False)
    s = stack(home)
    env = s.compose_env(state(home))
    assert env["HOSTGPU_STACK_STATE"] == str(home / "stack")
    assert env["HOSTGPU_UID"] == str(os.getuid())
    assert env["HOSTGPU_STACK_GATEWAY_PORT"] == "8765"
    assert "HOSTGPU_STACK_DATABASE_URL" not in env
    from importlib import metadata

    assert env["CHROMADB_VERSION"] == metadata.version("chromadb")
    assert env["COPYPARTY_VERSION"] == metadata.version("copyparty")

    pg = s.compose_env(state(home, postgres=True, rootless=True))
    password = (home / "stack/postgres-password").read_text().strip()
    assert (
        pg["HOSTGPU_STACK_DATABASE_URL"] == f"postgresql://hostgpu:{password}@postgres:5432/hostgpu"
    )
    assert mode(home / "stack/postgres-password") == 0o600
    assert (pg["HOSTGPU_UID"], pg["HOSTGPU_GID"]) == ("0", "0")  # rootless: root inside


def test_worker_environment_carries_the_token_and_the_upload_root(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOSTGPU_INGEST_ROOTS", "/srv/shared")
    monkeypatch.setenv("HOSTGPU_DATABASE_URL", "postgresql://elsewhere")
    env = stack(home).worker_env(state(home, ports={"gateway": 1, "chroma": 2, "uploads": 3}), "t")
    assert env["HOSTGPU_TOKEN"] == "t" and env["HOSTGPU_GATEWAY"] == "http://127.0.0.1:1"
    assert (env["CHROMA_HOST"], env["CHROMA_PORT"]) == ("127.0.0.1", "2")
    assert env["HOSTGPU_UPLOAD_ROOT"] == str(home / "inbox")
    assert env["HOSTGPU_INGEST_ROOTS"] == os.pathsep.join(["/srv/shared", str(home / "inbox")])
    assert "HOSTGPU_DATABASE_URL" not in env


def test_project_names_and_compose_file(home: Path, tmp_path: Path) -> None:
    assert default_project(Path("~/.hostgpu")) == "hostgpu"
    assert default_project(home).startswith("hostgpu-") and default_project(
        home
    ) != default_project(tmp_path)
    assert find_compose_file() == ROOT / "deploy/hybrid/compose.yaml"
    with pytest.raises(StackError, match="--compose-file"):
        find_compose_file(tmp_path / "nope.yaml")


def test_the_stack_reads_its_compose_file_and_project_from_settings(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HOSTGPU_STACK_COMPOSE_FILE and HOSTGPU_STACK_PROJECT reach the stack through its
    settings (one path), and explicit arguments still win."""
    compose = tmp_path / "compose.yaml"
    compose.write_text("services: {}\n")
    monkeypatch.setenv("HOSTGPU_STACK_COMPOSE_FILE", str(compose))
    monkeypatch.setenv("HOSTGPU_STACK_PROJECT", "mine")
    from_env = HybridStack(Settings(home=home))
    assert from_env._compose_file == compose and from_env.project() == "mine"
    explicit = HybridStack(Settings(home=home), compose_file=ROOT / "x.yaml", project="other")
    assert explicit._compose_file == ROOT / "x.yaml" and explicit.project() == "other"


def test_commands_without_state_say_what_to_do(home: Path) -> None:
    with pytest.raises(StackError, match="hostgpu stack up"):
        stack(home).status()
    with pytest.raises(StackError, match="nothing was started"):
        stack(home).down()


def test_container_from_docker_inspect() -> None:
    inspected = {
        "Id": "0123456789abcdef0123",
        "Name": "/hostgpu-gateway-1",
        "Config": {
            "Image": "hostgpu/gateway:local",
            "Labels": {"com.docker.compose.service": "gateway"},
        },
        "State": {"Status": "running", "ExitCode": 0, "Health": {"Status": "starting"}},
        "NetworkSettings": {"Ports": {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8765"}]}},
    }
    c = Container.from_inspect(inspected)
    assert (c.id, c.name, c.service) == ("0123456789ab", "hostgpu-gateway-1", "gateway")
    assert c.ports == ["127.0.0.1:8765->8000/tcp"] and not c.ready
    no_check = Container.from_inspect({**inspected, "State": {"Status": "running"}})
    assert no_check.ready and no_check.health is None


def test_stack_up_says_what_to_do_without_a_daemon(home: Path) -> None:
    """A real `hostgpu stack up` with an engine that is not there: reason and fix, exit 1."""
    import shutil
    import subprocess

    if shutil.which("docker") is None:
        pytest.skip("needs the docker CLI (the daemon may be absent)")

    from hostgpu.processes import hostgpu_command

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")},
        "HOSTGPU_HOME": str(home),
        "DOCKER_HOST": f"unix://{home}/no-engine.sock",
        "COLUMNS": "300",
    }
    done = subprocess.run(
        hostgpu_command("stack", "up"), env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Docker is not ready for the stack" in done.stderr
    assert f"nothing answers at DOCKER_HOST=unix://{home}/no-engine.sock" in done.stderr
    assert "fix: start the engine that owns that socket, or unset DOCKER_HOST" in done.stderr
    assert not (home / "stack/state.json").exists()  # nothing started, nothing to clean


def test_service_environment_forwards_model_settings_but_no_secret(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service manager starts the worker with a bare environment: the unit carries the
    shell's model and thread settings, and never a name that may hold a secret."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    monkeypatch.setenv("HOSTGPU_INFER_KEEPALIVE_SECONDS", "30")
    for secret in ("HOSTGPU_TOKEN", "HF_TOKEN", "HOSTGPU_DATABASE_URL", "HOSTGPU_ADMIN_TOKEN_FILE"):
        monkeypatch.setenv(secret, "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    env = stack(home).service_env(state(home, ports={"gateway": 1, "chroma": 2, "uploads": 3}))
    assert "s3cret" not in env.values()
    assert (env["HF_HUB_OFFLINE"], env["OMP_NUM_THREADS"]) == ("1", "4")
    assert env["HOSTGPU_INFER_KEEPALIVE_SECONDS"] == "30"
    assert env["HOSTGPU_GATEWAY"] == "http://127.0.0.1:1" and env["CHROMA_PORT"] == "2"
    assert env["HOSTGPU_HOME"] == str(home)


def test_stack_up_service_without_a_service_manager_stops_before_docker(home: Path) -> None:
    """`stack up --service` where no user service manager answers (this machine: systemctl
    finds no bus; elsewhere: none on PATH) says why and what to do, and starts nothing."""
    import subprocess
    import sys

    if sys.platform == "darwin":
        pytest.skip("a Mac's launchd always has a session for the logged-in user")

    from hostgpu.processes import hostgpu_command

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")},
        "HOSTGPU_HOME": str(home),
        "DOCKER_HOST": f"unix://{home}/no-engine.sock",  # were it reached, this would fail
        "XDG_RUNTIME_DIR": str(home / "no-session"),
        "DBUS_SESSION_BUS_ADDRESS": f"unix:path={home}/no-bus",
        "COLUMNS": "300",
    }
    done = subprocess.run(
        hostgpu_command("stack", "up", "--service"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Docker is not ready" not in done.stderr
    assert "without --service" in done.stderr
    assert "daemon-reload failed" in done.stderr or "not on PATH" in done.stderr, done.stderr
    assert not (home / "stack").exists()


def test_each_home_has_its_own_service(tmp_path: Path) -> None:
    """Two stacks' services never overwrite or stop each other: the default home's is
    hostgpu-stack, another home's carries its project."""
    from hostgpu.stack.hybrid import service_kind
    from hostgpu.worker.service import command_service

    assert service_kind("hostgpu") == "stack"
    kind = service_kind(default_project(tmp_path))
    assert kind.startswith("stack-") and kind != "stack"
    unit = command_service("linux", ["hostgpu"], tmp_path / "t", tmp_path, tmp_path, kind)
    assert unit.path.name == f"hostgpu-{kind}.service"
    assert "Description=hostgpu native worker of the hybrid stack" in unit.content
    plist = command_service("darwin", ["hostgpu"], tmp_path / "t", tmp_path, tmp_path, kind)
    assert plist.path.name == f"dev.hostgpu.{kind}.plist"
