"""`hostgpu worker install` (and `hostgpu share --install`): run the worker (or a lender) as a
launchd agent (macOS) or systemd user unit.

The worker must run natively (not in a container) to reach Metal or CUDA; a service
manager keeps it running across logins and restarts it when it exits.

A service file never holds a token: it names a token *file* (``HOSTGPU_TOKEN_FILE``, mode
0600, which the worker refuses to read when it is any looser). Unit files and plists are
readable by other tools (``systemctl --user show`` prints ``Environment=``, backups copy
``~/Library/LaunchAgents``), a 0600 file beside the store is not.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hostgpu.processes import worker_command


def launchd_label(kind: str = "worker") -> str:
    return f"dev.hostgpu.{kind}"


def systemd_unit_name(kind: str = "worker") -> str:
    return f"hostgpu-{kind}.service"


#: The function worker's service; ``hostgpu share --install`` writes a "share" one beside it
#: and ``hostgpu stack up --service`` a "stack" one (the worker of the hybrid stack).
LAUNCHD_LABEL = launchd_label()
SYSTEMD_UNIT = systemd_unit_name()
DESCRIPTIONS = {
    "worker": "hostgpu native worker",
    "share": "hostgpu: lending this machine",
    "stack": "hostgpu native worker of the hybrid stack",
}
#: Seconds a warm stop may take (running jobs finish) before the service manager kills.
STOP_GRACE_S = 60


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    content: str
    start_hint: str


@dataclass(frozen=True)
class Manager:
    """How a platform's service manager loads, unloads and reports the worker's service."""

    tool: str  # the program that must be on PATH
    load: list[str]
    unload: list[str]
    state: list[str]  # exit status 0: loaded and running
    #: Before ``load``: systemd rereads unit files; its exit status also says whether a
    #: user session answers at all.
    reload: list[str] | None = None


def run_manager(argv: list[str]) -> tuple[int, str] | None:
    """Run a service-manager command; None when its tool is not on PATH."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, (done.stdout + done.stderr).strip()


def manager(platform: str, path: Path, kind: str = "worker") -> Manager:
    if platform == "darwin":
        domain = f"gui/{os.getuid()}"
        label = launchd_label(kind)
        return Manager(
            "launchctl",
            ["launchctl", "bootstrap", domain, str(path)],
            ["launchctl", "bootout", f"{domain}/{label}"],
            ["launchctl", "print", f"{domain}/{label}"],
            ["launchctl", "print", domain],
        )
    unit = systemd_unit_name(kind)
    return Manager(
        "systemctl",
        ["systemctl", "--user", "enable", "--now", unit],
        ["systemctl", "--user", "disable", "--now", unit],
        ["systemctl", "--user", "is-active", "--quiet", unit],
        ["systemctl", "--user", "daemon-reload"],
    )


def service_path(platform: str, home: Path, kind: str = "worker") -> Path:
    if platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{launchd_label(kind)}.plist"
    return home / ".config" / "systemd" / "user" / systemd_unit_name(kind)


@dataclass(frozen=True)
class ServiceSpec:
    """What a service runs, whatever the platform writes it as."""

    command: list[str]
    env: Mapping[str, str]
    home: Path  # the user's home: where the service manager looks for the file
    kind: str = "worker"  # worker, share or stack
    log: Path | None = None  # else the platform's default (a file; the journal)


def launchd_plist(spec: ServiceSpec) -> ServiceFile:
    kind = spec.kind
    logfile = str(spec.log or spec.home / "Library" / "Logs" / "hostgpu" / f"{kind}.log")
    plist = {
        "Label": launchd_label(kind),
        "ProgramArguments": spec.command,
        "EnvironmentVariables": dict(sorted(spec.env.items())),
        "RunAtLoad": True,
        # A worker runs for good; a lender that reached its time limit exits 0 and stays
        # stopped (it is restarted only after a failure).
        "KeepAlive": True if kind != "share" else {"SuccessfulExit": False},
        # A worker that exits at once (gateway refused its token) is restarted at most
        # every 10 s, not in a tight loop.
        "ThrottleInterval": 10,
        # launchd sends SIGTERM (a warm stop), then SIGKILL after this many seconds.
        "ExitTimeOut": STOP_GRACE_S,
        "StandardOutPath": logfile,
        "StandardErrorPath": logfile,
    }
    content = plistlib.dumps(plist, sort_keys=False).decode()
    path = service_path("darwin", spec.home, kind)
    load = shlex.join(manager("darwin", path, kind).load)
    hint = f"mkdir -p {shlex.quote(str(Path(logfile).parent))} && {load}"
    return ServiceFile(path, content, hint)


def _systemd_quote(arg: str) -> str:
    # systemd's own quoting: double quotes, backslash escapes, and "%" doubled (specifiers).
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    plain = escaped == arg and arg and not any(c.isspace() or c in "'\";$" for c in arg)
    return arg if plain else f'"{escaped}"'


def systemd_unit(spec: ServiceSpec) -> ServiceFile:
    kind = spec.kind
    env_lines = "\n".join(
        f"Environment={_systemd_quote(f'{k}={v}')}" for k, v in sorted(spec.env.items())
    )
    if spec.log is not None:  # else the journal: `journalctl --user -u UNIT`
        target = "append:" + str(spec.log.absolute()).replace("%", "%%")
        env_lines += f"\nStandardOutput={target}\nStandardError={target}"
    content = f"""[Unit]
Description={DESCRIPTIONS[kind.split("-")[0]]}
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={" ".join(_systemd_quote(a) for a in spec.command)}
{env_lines}
Restart=on-failure
RestartSec=5
# The first SIGTERM is a warm stop: running jobs get TimeoutStopSec to finish. "mixed"
# sends it to the worker only (the default would also hit its job children at once, killing
# the jobs a warm stop lets finish); whatever is left after the timeout is SIGKILLed.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_GRACE_S}

[Install]
WantedBy=default.target
"""
    path = service_path("linux", spec.home, kind)
    hint = (
        f"systemctl --user daemon-reload && {shlex.join(manager('linux', path, kind).load)}\n"
        "  loginctl enable-linger $USER   # to keep it running after you log out"
    )
    return ServiceFile(path, content, hint)


def service_file(
    platform: str,
    *,
    gateway: str,
    token_file: Path,
    modules: list[str],
    concurrency: int,
    home: Path,
    hostgpu_home: Path,
) -> ServiceFile:
    """The service file for ``platform`` ("darwin": launchd; else systemd)."""
    command = worker_command(gateway, modules, concurrency)
    return command_service(platform, command, token_file, home, hostgpu_home)


def command_service(
    platform: str,
    command: list[str],
    token_file: Path,
    home: Path,
    hostgpu_home: Path,
    kind: str = "worker",
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> ServiceFile:
    """A service running ``command`` with its token in ``token_file`` (``kind``: worker, share,
    stack). ``env`` adds settings (never secrets: a service file is readable); ``log`` sends
    its output to that file instead of the platform's default."""
    merged = {
        **(env or {}),
        "HOSTGPU_TOKEN_FILE": str(token_file.absolute()),
        "HOSTGPU_HOME": str(hostgpu_home),
    }
    spec = ServiceSpec(command, merged, home, kind, log)
    return launchd_plist(spec) if platform == "darwin" else systemd_unit(spec)


def write(service: ServiceFile) -> None:
    service.path.parent.mkdir(parents=True, exist_ok=True)
    service.path.write_text(service.content)
    if service.path.suffix == ".plist":  # launchd does not create the log folder
        (service.path.parents[2] / "Logs" / "hostgpu").mkdir(parents=True, exist_ok=True)
