"""A stand-in for ``systemctl --user``, for the one thing no test machine here has: a systemd
user session (no systemd runs as PID 1 in this container, so ``systemctl --user`` answers
"Failed to connect to bus").

It does what the user manager does with a ``hostgpu stack up --service`` unit, from the unit
file alone: ``ExecStart=`` (systemd's quoting, ``%%`` → ``%``), ``Environment=`` lines, and
``StandardOutput=append:``; the process starts with the manager's bare environment plus the
unit's, so a unit that leans on the caller's shell fails here as it would under systemd.
``disable --now`` is ``KillMode=mixed``: SIGTERM to the main process, ``TimeoutStopSec`` to
exit, then SIGKILL to its process group. The unit's syntax is checked by the real
``systemd-analyze verify`` in the tests, not here.

Supports: ``--user daemon-reload | enable --now UNIT | disable --now UNIT |
is-active --quiet UNIT``. State (pids) lives in ``$HOME/.local/state/systemctl-standin``.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

HOME = Path(os.environ["HOME"])
UNITS = HOME / ".config/systemd/user"
STATE = HOME / ".local/state/systemctl-standin"
#: What systemd's user manager gives every service before the unit's own Environment=.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": str(HOME),
    "LANG": "C.UTF-8",
}


def parse(unit: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def pid_of(name: str) -> int | None:
    try:
        pid = int((STATE / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
    except OSError:
        return None
    return pid


def start(name: str) -> int:
    if pid_of(name) is not None:
        return 0
    settings = parse(UNITS / name)
    argv = shlex.split(settings["ExecStart"][0].replace("%%", "%"))
    env = dict(BASE_ENV)
    for line in settings.get("Environment", []):
        for pair in shlex.split(line.replace("%%", "%")):
            key, value = pair.split("=", 1)
            env[key] = value
    output = settings.get("StandardOutput", ["append:/dev/null"])[0]
    assert output.startswith("append:"), output
    with open(output.removeprefix("append:").replace("%%", "%"), "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            start_new_session=True,
        )
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return 0


def stop(name: str) -> int:
    pid = pid_of(name)
    if pid is None:
        return 0
    unit = parse(UNITS / name) if (UNITS / name).exists() else {}
    grace = float(unit.get("TimeoutStopSec", ["90"])[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pid_of(name) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_of(name) is not None:
        os.killpg(pid, signal.SIGKILL)
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    return 0


def main(args: list[str]) -> int:
    if args[:1] != ["--user"]:
        print("systemctl stand-in: only --user is supported", file=sys.stderr)
        return 2
    verb, rest = args[1], [a for a in args[2:] if not a.startswith("--")]
    if verb == "daemon-reload":
        return 0
    if verb == "enable":
        return start(rest[0]) if "--now" in args else 0
    if verb == "disable":
        return stop(rest[0]) if "--now" in args else 0
    if verb == "is-active":
        return 0 if pid_of(rest[0]) is not None else 3
    print(f"systemctl stand-in: {verb} is not supported", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
