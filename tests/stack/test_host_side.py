"""The host-side pieces of the stack, with real gateway and worker processes (no Docker):

- a gateway adopts the admin secret `hostgpu stack up` made (HOSTGPU_ADMIN_TOKEN_FILE);
- copyparty's stdlib-only upload hook (deploy/hybrid/upload_hook.py) queues ingest jobs;
- a worker inside a container on a Mac's Linux VM refuses to start unless --allow-container.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hostgpu.processes import free_port, hostgpu_command
from hostgpu.testing import child_env
from tests.conftest import ROOT, Gateway, Worker
from tests.unit.test_devices import docker_desktop_mac

HOOK = ROOT / "deploy/hybrid/upload_hook.py"


# --------------------------------------------------------------------------- admin token


def test_gateway_adopts_the_admin_secret_from_a_file(home: Path) -> None:
    secret = f"hga_{secrets.token_urlsafe(32)}"
    given = home / "given-admin-token"
    given.write_text(secret + "\n")
    given.chmod(0o600)
    gw = Gateway(
        home, f"sqlite:///{home / 'hostgpu.db'}", env_extra={"HOSTGPU_ADMIN_TOKEN_FILE": str(given)}
    )
    gw.start()
    try:
        headers = {"Authorization": f"Bearer {secret}"}
        tokens = httpx.get(f"{gw.url}/v1/tokens", headers=headers)
        assert tokens.status_code == 200, tokens.text
        assert [t["scope"] for t in tokens.json()["tokens"]] == ["admin"]
        # The secret stays where the host put it: no second copy is written.
        assert not (home / "admin-token").exists()
        assert "the admin token is in" in gw.log_text()
    finally:
        gw.stop()
    # A restart with a different file keeps the first secret: only a first start adopts one.
    given.write_text(f"hga_{secrets.token_urlsafe(32)}\n")
    gw = Gateway(
        home, f"sqlite:///{home / 'hostgpu.db'}", env_extra={"HOSTGPU_ADMIN_TOKEN_FILE": str(given)}
    )
    gw.start()
    try:
        again = httpx.get(f"{gw.url}/v1/tokens", headers={"Authorization": f"Bearer {secret}"})
        assert again.status_code == 200
    finally:
        gw.stop()


def test_gateway_refuses_a_weak_or_missing_admin_secret(home: Path) -> None:
    weak = home / "weak"
    weak.write_text("short\n")
    for path, says in ((weak, "at least 32 characters"), (home / "absent", "cannot be read")):
        env = child_env(home, HOSTGPU_ADMIN_TOKEN_FILE=str(path))
        done = subprocess.run(
            hostgpu_command(
                "gateway",
                "--port",
                str(free_port()),
                "--database-url",
                f"sqlite:///{home / f'{path.name}.db'}",
            ),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        stderr = " ".join(done.stderr.split())  # rich wraps long lines
        assert says in stderr
        assert "HOSTGPU_ADMIN_TOKEN_FILE" in stderr


# --------------------------------------------------------------------------- upload hook


@pytest.fixture(scope="module")
def uploads_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Path]]:
    base = tmp_path_factory.mktemp("hook")
    home, root = base / "home", base / "inbox"
    home.mkdir()
    root.mkdir()
    gw = Gateway(
        home,
        f"sqlite:///{home / 'hostgpu.db'}",
        env_extra={"HOSTGPU_UPLOAD_ROOT": str(root.resolve())},
    )
    gw.start()
    try:
        yield gw, root.resolve()
    finally:
        gw.stop()


def run_hook(event: object, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The hook as copyparty runs it, with -I -S: no site-packages, standard library only."""
    raw = event if isinstance(event, str) else json.dumps(event)
    return subprocess.run(
        [sys.executable, "-I", "-S", str(HOOK), raw],
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "submit-token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def test_hook_queues_an_ingest_job(uploads_gateway: tuple[Gateway, Path], tmp_path: Path) -> None:
    gw, root = uploads_gateway
    upload = root / "note.md"
    upload.write_text("# a note\nuploaded through copyparty\n")
    with gw.client() as api:
        submit = api.create_token("hook", "submit").token
    env = {"HOSTGPU_GATEWAY": gw.url, "HOSTGPU_TOKEN_FILE": str(token_file(tmp_path, submit))}
    done = run_hook({"ap": str(upload), "vp": "note.md", "sz": upload.stat().st_size}, env)
    assert done.returncode == 0, done.stderr
    assert "queued ingest job" in done.stderr
    job_id = done.stderr.split("queued ingest job ")[1].split()[0]
    with gw.client() as api:
        job = api.get(job_id)
    assert job.payload is not None and job.payload.args == [str(upload)]  # type: ignore[union-attr]
    # The same event again folds into the same job (idempotency key of path, size, mtime).
    again = run_hook({"ap": str(upload), "vp": "note.md"}, env)
    assert again.returncode == 0 and job_id in again.stderr


def test_hook_refusals_are_logged_not_raised(
    uploads_gateway: tuple[Gateway, Path], tmp_path: Path
) -> None:
    gw, root = uploads_gateway
    inside = root / "x.txt"
    inside.write_text("x")
    outside = tmp_path / "secret.txt"
    outside.write_text("not an upload")
    with gw.client() as api:
        submit = api.create_token("hook", "submit").token
        worker = api.create_token("w", "worker").token
    good = {"HOSTGPU_GATEWAY": gw.url, "HOSTGPU_TOKEN_FILE": str(token_file(tmp_path, submit))}

    outside_root = run_hook({"ap": str(outside), "vp": "secret.txt"}, good)
    assert outside_root.returncode == 1 and "HTTP 403" in outside_root.stderr

    wrong_scope = run_hook(
        {"ap": str(inside)}, {"HOSTGPU_GATEWAY": gw.url, "HOSTGPU_TOKEN": worker}
    )
    assert wrong_scope.returncode == 1 and "HTTP 403" in wrong_scope.stderr

    no_file = run_hook(
        {"ap": str(inside)},
        {"HOSTGPU_GATEWAY": gw.url, "HOSTGPU_TOKEN_FILE": str(tmp_path / "absent")},
    )
    assert no_file.returncode == 1 and "cannot read the token file" in no_file.stderr

    gone = run_hook(
        {"ap": str(inside)}, {**good, "HOSTGPU_GATEWAY": f"http://127.0.0.1:{free_port()}"}
    )
    assert gone.returncode == 1 and "unreachable after 4 tries" in gone.stderr

    # copyparty's own files are skipped without asking anybody; bad events exit 2.
    assert run_hook({"ap": "/x/.hist/up2k.db", "vp": ".hist/up2k.db"}, {}).returncode == 0
    assert run_hook("not json", {}).returncode == 2
    assert run_hook({"vp": "no absolute path"}, {}).returncode == 2


# --------------------------------------------------------------------------- the worker rule


@pytest.fixture
def mac_vm_facts() -> Iterator[str]:
    fd, name = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(docker_desktop_mac().to_json())
    yield name
    os.unlink(name)


def test_worker_in_a_mac_vm_refuses_to_start(home: Path, mac_vm_facts: str) -> None:
    env = child_env(home, HOSTGPU_PROBE_FACTS=mac_vm_facts, HOSTGPU_TOKEN="unused")
    done = subprocess.run(
        hostgpu_command("worker", "--gateway", f"http://127.0.0.1:{free_port()}"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    stderr = " ".join(done.stderr.split())  # rich wraps long lines
    assert "refusing to start" in stderr
    assert "Docker Desktop" in stderr
    assert "natively on the Mac" in stderr and "--allow-container" in stderr


def test_allow_container_overrides_the_refusal(gateway: Gateway, mac_vm_facts: str) -> None:
    worker = Worker(
        gateway,
        imports=(),
        extra_args=("--allow-container",),
        env_extra={"HOSTGPU_PROBE_FACTS": mac_vm_facts},
    ).start()
    try:
        with gateway.client() as api:
            [mine] = [w for w in api.workers(alive=True) if w.capabilities.name == worker.name]
        # Metal is unreachable in the VM: the worker offers the CPU only, and says so.
        assert [d.kind for d in mine.capabilities.devices] == ["cpu"]
        assert "Metal is unreachable" in mine.capabilities.unavailable["mps"]
    finally:
        worker.stop()
