"""The CLI as people use it: `hostgpu up`, then the other commands against it."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from hostgpu.testing import Gateway, free_port


def hostgpu(
    home: Path, *args: str, check: bool = True, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(HOSTGPU_HOME=str(home), COLUMNS=str(columns), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "hostgpu", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture
def up(home: Path) -> Iterator[subprocess.Popen[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
    env.update(HOSTGPU_HOME=str(home), HF_HUB_OFFLINE="1")
    port = free_port()
    # Its output goes to a file: a pipe nobody reads could fill and block `up` mid-stop.
    output = open(home / "up-output.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostgpu", "up", "--port", str(port)],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    url = f"http://127.0.0.1:{port}"
    token_file = home / "admin-token"
    while time.monotonic() < deadline:
        assert proc.poll() is None, (home / "up-output.txt").read_text()
        if token_file.exists():
            # The token is written before the gateway listens: refused connections are
            # expected for a moment.
            try:
                reply = httpx.get(
                    f"{url}/v1/workers",
                    params={"alive": True},
                    headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
                )
            except httpx.TransportError:
                reply = None
            # `up` is up once its worker publishes functions (it registers once before).
            if (
                reply is not None
                and reply.status_code == 200
                and any(w["capabilities"]["functions"] for w in reply.json()["workers"])
            ):
                break
        time.sleep(0.2)
    else:
        pytest.fail("hostgpu up did not bring a worker up")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    output.close()


def test_one_up_per_home_and_down_stops_everything(up: subprocess.Popen[str], home: Path) -> None:
    family = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
    assert len(family) >= 3  # up, gateway, worker (and its children)
    second = hostgpu(home, "up", check=False)
    assert second.returncode != 0 and "hostgpu down" in second.stdout + second.stderr
    stopped = hostgpu(home, "down")
    assert f"pid {up.pid}" in stopped.stdout
    assert up.wait(30) == 0
    left = psutil.wait_procs(family, timeout=30)[1]
    assert not left, f"still running after hostgpu down: {left}"
    assert not (home / "up.pid").exists()
    assert "nothing to stop" in hostgpu(home, "down").stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_up_stops_its_processes_on_sigterm_and_sighup(
    up: subprocess.Popen[str], signum: int
) -> None:
    family = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
    up.send_signal(signum)
    assert up.wait(60) == 0
    left = psutil.wait_procs(family, timeout=30)[1]
    assert not left, f"orphans after {signal.Signals(signum).name}: {left}"


def test_a_busy_port_given_is_an_error(home: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = hostgpu(home, "up", "--port", str(port), check=False)
    assert out.returncode != 0 and f"port {port} is in use" in out.stdout + out.stderr


def test_a_bad_setting_is_one_error_line_naming_the_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVICE", "bogus")
    out = hostgpu(home, "jobs", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: DEVICE='bogus'"), out.stderr
    record = json.loads(hostgpu(home, "jobs", "--json", check=False).stdout)
    assert record["error"]["type"] == "ConfigError" and "DEVICE" in record["error"]["message"]


def test_doctor_json_and_require(home: Path) -> None:
    report = json.loads(hostgpu(home, "doctor", "--json").stdout)
    assert report["devices"][-1]["kind"] == "cpu"
    assert any(m["kind"] == "cuda" and m["fix"] for m in report["missing"])
    refused = hostgpu(home, "doctor", "--require", "cuda", check=False)
    assert refused.returncode == 1


def test_up_then_commands_then_ctrl_c(up: subprocess.Popen[str], home: Path) -> None:
    children = psutil.Process(up.pid).children(recursive=True)
    done = hostgpu(home, "submit", "hostgpu.builtin:whoami", "--json")
    job = json.loads(done.stdout)
    assert job["state"] == "succeeded" and job["device"] == "cpu"
    # Longer than a long poll's 60 s limit: the command asks again as often as it takes.
    assert '"succeeded"' in hostgpu(home, "job", job["id"], "--wait", "90", "--json").stdout

    queued = hostgpu(home, "submit", "hostgpu.builtin:noop", "--gpu", "mps", "--no-wait")
    job_id = queued.stdout.strip()
    shown = hostgpu(home, "job", job_id)
    assert "waiting: no worker with mps" in shown.stdout
    listed = json.loads(hostgpu(home, "jobs", "--json").stdout)
    assert {j["id"] for j in listed} >= {job["id"], job_id}
    assert '"queued": 1' in hostgpu(home, "jobs", "--summary", "--json").stdout
    # Too narrow for the table's columns: one `header: value` line each, nothing cut away.
    narrow = hostgpu(home, "jobs", columns=20).stdout
    assert f"id: {job_id[:12]}" in narrow and "hostgpu.builtin:noop" in narrow
    # A failure under --json is JSON too, for the pipe that reads it.
    missing = hostgpu(home, "job", "0123456789abcdef", "--json", check=False)
    assert missing.returncode == 1 and missing.stderr == ""
    assert json.loads(missing.stdout)["error"]["type"] == "NotFound"
    hostgpu(home, "cancel", job_id)
    assert "cpu" in hostgpu(home, "workers").stdout

    created = json.loads(hostgpu(home, "token", "create", "--scope", "submit", "--json").stdout)
    assert created["token"] and created["scope"] == "submit"
    # As `job` does, `token revoke` takes a unique prefix, and says which token it revoked.
    revoked = hostgpu(home, "token", "revoke", created["id"][:6]).stdout
    assert f"revoked {created['id']} (submit:" in revoked
    none = hostgpu(home, "token", "revoke", "0000ffff", check=False)
    assert none.returncode == 1 and "no active token with id '0000ffff'" in none.stderr
    assert "submit" in hostgpu(home, "token", "list").stdout
    unasked = hostgpu(home, "prune", "--older-than", "0s", check=False)  # no terminal to ask
    assert unasked.returncode != 0 and "--yes" in unasked.stdout + unasked.stderr
    assert "deleted 2" in hostgpu(home, "prune", "--older-than", "0s", "--yes").stdout
    assert hostgpu(home, "--version").stdout.startswith("hostgpu 0.")

    bad = hostgpu(home, "submit", "hostgpu.builtin:noop", "--gpu", "tpu", check=False)
    assert bad.returncode != 0 and "gpu must be one of" in (bad.stdout + bad.stderr)

    up.send_signal(signal.SIGINT)
    try:
        assert up.wait(60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("up did not stop on Ctrl-C:\n" + (home / "up-output.txt").read_text())
    gone = psutil.wait_procs(children, timeout=30)[1]
    assert not gone, f"children still running after Ctrl-C: {gone}"


def test_worker_install_prints_service_files(home: Path) -> None:
    token_file = home / "worker-token"
    token_file.write_text("hgw_secret_x\n")
    token_file.chmod(0o644)
    loose = hostgpu(
        home, "worker", "install", "--print", "--token-file", str(token_file), check=False
    )
    assert loose.returncode != 0 and "chmod 600" in loose.stdout + loose.stderr
    token_file.chmod(0o600)
    for platform, needle in (("darwin", "<key>KeepAlive</key>"), ("linux", "KillMode=mixed")):
        out = hostgpu(
            home,
            "worker",
            "install",
            "--platform",
            platform,
            "--print",
            "--gateway",
            "http://gw:8765",
            "--token-file",
            str(token_file),
            "--import",
            "my.tasks",
        ).stdout
        assert needle in out and "my.tasks" in out and "http://gw:8765" in out
        assert str(token_file) in out and "hgw_secret_x" not in out  # a path, never the token


def test_worker_install_mints_a_worker_token_into_a_private_file(
    gateway: Gateway, tmp_path: Path
) -> None:
    """Without --token-file the service gets its own worker-scoped token (never the admin
    token), in a file created 0600; the unit names the file and holds no secret."""
    fake_home = tmp_path / "user"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        """`hostgpu worker ARGS` as this user, on Linux, against the test gateway."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTGPU_")}
        env.update(HOSTGPU_HOME=str(gateway.home), HOME=str(fake_home))
        platform = ["--platform", "linux", "--gateway", gateway.url]
        return subprocess.run(
            [sys.executable, "-m", "hostgpu", "worker", *args, *platform],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    done = cli("install", "--import", "my.tasks")
    assert done.returncode == 0, done.stdout + done.stderr
    minted = gateway.home / "worker-token"
    assert minted.stat().st_mode & 0o777 == 0o600
    secret = minted.read_text().strip()
    unit = (fake_home / ".config/systemd/user/hostgpu-worker.service").read_text()
    assert f"HOSTGPU_TOKEN_FILE={minted}" in unit and secret not in unit
    assert secret not in done.stdout + done.stderr
    with gateway.http(token=secret) as http:
        assert http.get("/v1/tokens/self").json()["scope"] == "worker"
        assert http.get("/v1/tokens").status_code == 403  # not an admin

    status = json.loads(cli("status", "--json").stdout)
    assert status["installed"] and status["token_file_present"]
    assert status["gateway_error"] is None and status["manager"] == "systemctl"
    removed = cli("uninstall")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "revoked worker token" in removed.stdout
    assert not (fake_home / ".config/systemd/user/hostgpu-worker.service").exists()
    assert not minted.exists()
    with gateway.http(token=secret) as http:
        assert http.get("/v1/tokens/self").status_code == 401  # the service's token is dead
    assert json.loads(cli("status", "--json").stdout)["installed"] is False


def test_rows_stored_with_lone_surrogates_are_listed_with_escapes(gateway: Gateway) -> None:
    # Before the gateway refused lone surrogates (422), a payload or result with one was
    # stored as its JSON escape; read back, it failed every listing that showed it (500).
    with gateway.http() as http:
        job_id = http.post(
            "/v1/jobs", json={"function": "hostgpu.builtin:noop", "payload": {"args": ["x"]}}
        ).json()["id"]
    with sqlite3.connect(gateway.home / "hostgpu.db") as db:
        db.execute(
            "UPDATE jobs SET payload = ?, result = ?, state = 'succeeded' WHERE id = ?",
            (
                '{"args":["caf\\udce9"],"kwargs":{}}',
                '{"\\udcff":["\\ud800 and \\ud83d\\ude00"]}',
                job_id,
            ),
        )
    with gateway.http() as http:
        listed = http.get("/v1/jobs")
        assert listed.status_code == 200, listed.text
        [job] = listed.json()["jobs"]
        assert job["payload"]["args"] == ["caf\\udce9"]  # the escape, as text
        assert job["result"] == {"\\udcff": ["\\ud800 and \U0001f600"]}  # a pair is text
        assert http.get(f"/v1/jobs/{job_id}").json()["payload"] == job["payload"]
    cli = ("--gateway", gateway.url)
    [shown] = json.loads(hostgpu(gateway.home, "jobs", "--json", *cli).stdout)
    assert shown["payload"] == job["payload"]
    assert job_id[:12] in hostgpu(gateway.home, "jobs", *cli).stdout
    assert r'result: {"\\udcff": ' in hostgpu(gateway.home, "job", job_id, *cli).stdout
