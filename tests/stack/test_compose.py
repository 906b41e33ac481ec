"""The Compose runner against the real engine, on a two-service project made from BASE_IMAGE:
up waits for health (``--wait`` on v2, polling on v1), a failing service fails `up` with its
own log lines, logs and down work; for each Compose version installed here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from hostgpu.processes import free_port
from hostgpu.stack.compose import Compose, ComposeError, Container
from hostgpu.stack.docker import ComposeInfo, DockerReport, choose_compose, run_cli

pytestmark = pytest.mark.docker

TINY = """
services:
  web:
    image: ${BASE_IMAGE}
    pull_policy: never
    init: true
    command: ["python3", "-u", "-m", "http.server", "8000"]
    ports: ["127.0.0.1:${WEB_PORT}:8000"]
    healthcheck:
      test: ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/')"]
      interval: 1s
      retries: 60
  broken:
    image: ${BASE_IMAGE}
    pull_policy: never
    profiles: ["broken"]
    command: ["sh", "-c", "echo broken on purpose; exit 3"]
"""


def compose_for(version: str, engine: DockerReport) -> ComposeInfo:
    if version == "v2":
        if engine.compose is None or engine.compose.v1:
            pytest.skip("no Compose v2 here")
        return engine.compose
    found = run_cli(["docker-compose", "version", "--short"], 30)
    info = (
        choose_compose(None, found.stdout.strip() or None, False, "v1")
        if found.returncode == 0
        else None
    )
    if info is None:
        pytest.skip(
            "docker-compose v1 is not installed (COMPOSE=v1 ../shared/docker/engine up installs it)"
        )
    return info


@pytest.fixture
def base_image() -> str:
    image = os.environ.get("BASE_IMAGE", "")
    if not image or run_cli(["docker", "image", "inspect", image], 30).returncode != 0:
        pytest.skip("needs BASE_IMAGE present on the engine (../shared/docker/engine sets it)")
    return image


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_up_wait_logs_down(
    version: str, docker_engine: DockerReport, base_image: str, tmp_path: Path
) -> None:
    info = compose_for(version, docker_engine)
    path = tmp_path / "compose.yaml"
    path.write_text(TINY)
    port = free_port()
    project = f"hgtest-{version}-{os.getpid()}"
    compose = Compose(info, [path], project, env={"BASE_IMAGE": base_image, "WEB_PORT": str(port)})
    try:
        [web] = compose.up(["web"], timeout=120)
        assert isinstance(web, Container) and web.ready and web.health == "healthy"
        assert web.ports == [f"127.0.0.1:{port}->8000/tcp"]
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        assert "GET / HTTP" in compose.logs(["web"])

        broken = Compose(info, [path], project, env=compose.env, profiles=["broken"])
        with pytest.raises(ComposeError) as failed:
            broken.up(["broken"], timeout=60)
        assert "broken on purpose" in str(failed.value)
    finally:
        compose.down(profiles=["broken"])
    assert compose.containers() == []
    networks = subprocess.run(
        [
            "docker",
            "network",
            "ls",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={project}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert networks.stdout.strip() == ""
