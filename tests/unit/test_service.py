"""`hostgpu worker install`'s files, read back by the tools that will read them: plistlib for
launchd, `systemd-analyze verify` for systemd."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from hostgpu.processes import hostgpu_command, worker_command
from hostgpu.worker.service import command_service, service_file

# Arguments a shell or an XML writer would get wrong.
ODD = ["my.tasks", "pkg with space", "100%", 'quote"d', "a&b<c>"]


def _service(platform: str, tmp_path: Path) -> tuple[str, Path]:
    token = tmp_path / "dir with space" / "worker-token"
    service = service_file(
        platform,
        gateway="http://gw:8765/?x=1&y=%20",
        token_file=token,
        modules=ODD,
        concurrency=2,
        home=tmp_path,
        hostgpu_home=tmp_path / "hg",
    )
    return service.content, token


def test_launchd_plist_round_trips(tmp_path: Path) -> None:
    content, token = _service("darwin", tmp_path)
    plist = plistlib.loads(content.encode())
    assert plist["ProgramArguments"] == worker_command("http://gw:8765/?x=1&y=%20", ODD, 2)
    assert plist["EnvironmentVariables"] == {
        "HOSTGPU_TOKEN_FILE": str(token),
        "HOSTGPU_HOME": str(tmp_path / "hg"),
    }
    assert plist["KeepAlive"] is True and plist["ExitTimeOut"] == 60
    assert plist["ThrottleInterval"] == 10
    assert plist["StandardErrorPath"] == str(tmp_path / "Library/Logs/hostgpu/worker.log")


@pytest.mark.skipif(
    not shutil.which("systemd-analyze") and not os.environ.get("CI"),
    reason="needs systemd-analyze",
)
def test_systemd_unit_verifies_and_quotes(tmp_path: Path) -> None:
    content, token = _service("linux", tmp_path)
    assert "KillMode=mixed" in content and "HOSTGPU_TOKEN=" not in content
    unit = tmp_path / "hostgpu-worker.service"
    unit.write_text(content)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    # verify exits 0 even for settings it ignores; its warnings name the file.
    assert done.returncode == 0 and unit.name not in done.stdout + done.stderr, done.stderr
    # systemd splits ExecStart like a POSIX shell for these quotes, after "%%" → "%".
    exec_start = next(line for line in content.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%%", "%"))
    assert argv == worker_command("http://gw:8765/?x=1&y=%20", ODD, 2)
    assert f'Environment="HOSTGPU_TOKEN_FILE={token}"' in content


def test_share_install_writes_a_lender_service_with_its_limits(tmp_path: Path) -> None:
    """`hostgpu share --install --print`: a service of its own (not the worker's), the limits
    on its command line, an absolute end time, the token by file only, and no restart after
    the time limit's clean exit."""
    token = tmp_path / "share-token"
    token.write_text("hgs_secret\n")
    token.chmod(0o600)
    env = {**os.environ, "HOSTGPU_HOME": str(tmp_path / "hg"), "HOME": str(tmp_path)}
    args = ["share", "--gateway", "http://gw:8765", "--token-file", str(token)]
    args += ["--models", "smollm2", "--hours", "2", "--max-memory", "1.5", "--only-when-idle"]
    done = subprocess.run(
        [*hostgpu_command(*args), "--install", "--print"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    if sys.platform == "darwin":
        plist = plistlib.loads(done.stdout.encode())
        assert plist["Label"] == "dev.hostgpu.share"
        assert plist["KeepAlive"] == {"SuccessfulExit": False}
        command = plist["ProgramArguments"]
    else:
        assert "Description=hostgpu: lending this machine" in done.stdout
        assert "Restart=on-failure" in done.stdout
        line = next(x for x in done.stdout.splitlines() if x.startswith("ExecStart="))
        command = shlex.split(line.removeprefix("ExecStart="))
    assert "hgs_secret" not in done.stdout and str(token) in done.stdout
    assert command[command.index("--max-memory") + 1] == "1.5"
    assert "--only-when-idle" in command and "--hours" not in command
    until = datetime.fromisoformat(command[command.index("--until") + 1])
    assert abs((until - datetime.now()).total_seconds() - 7200) < 120
    plist = plistlib.loads(
        command_service(
            "darwin", command, token, tmp_path, tmp_path / "hg", kind="share"
        ).content.encode()
    )
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["StandardErrorPath"].endswith("Library/Logs/hostgpu/share.log")
