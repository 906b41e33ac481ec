"""`hostgpu worker install`: run the worker as a launchd agent (macOS) or systemd user unit.

The worker must run natively (not in a container) to reach Metal or CUDA; a service
manager keeps it running across logins and restarts it when it exits.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from hostgpu.processes import worker_command

LAUNCHD_LABEL = "dev.hostgpu.worker"
SYSTEMD_UNIT = "hostgpu-worker.service"


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    content: str
    start_hint: str


def launchd_plist(
    command: list[str], env: dict[str, str], home: Path, log_dir: Path
) -> ServiceFile:
    args = "\n".join(f"    <string>{escape(a)}</string>" for a in command)
    env_xml = "\n".join(
        f"    <key>{escape(k)}</key><string>{escape(v)}</string>" for k, v in sorted(env.items())
    )
    content = f"""<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>{LAUNCHD_LABEL}</string>
  <key>ProgramArguments</key>
  <array>
{args}
  </array>
  <key>EnvironmentVariables</key>
  <dict>
{env_xml}
  </dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
  <key>ExitTimeOut</key><integer>60</integer>
  <key>StandardOutPath</key><string>{escape(str(log_dir / "worker.log"))}</string>
  <key>StandardErrorPath</key><string>{escape(str(log_dir / "worker.log"))}</string>
</dict>
</plist>
"""
    path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    hint = f"launchctl bootstrap gui/$(id -u) {shlex.quote(str(path))}"
    return ServiceFile(path, content, hint)


def systemd_unit(command: list[str], env: dict[str, str], home: Path) -> ServiceFile:
    env_lines = "\n".join(f"Environment={shlex.quote(f'{k}={v}')}" for k, v in sorted(env.items()))
    content = f"""[Unit]
Description=hostgpu native worker
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={shlex.join(command)}
{env_lines}
Restart=on-failure
RestartSec=5
# The first SIGTERM is a warm stop: running jobs get this long to finish.
KillSignal=SIGTERM
TimeoutStopSec=60

[Install]
WantedBy=default.target
"""
    path = home / ".config" / "systemd" / "user" / SYSTEMD_UNIT
    hint = f"systemctl --user daemon-reload && systemctl --user enable --now {SYSTEMD_UNIT}"
    return ServiceFile(path, content, hint)


def service_file(
    platform: str,
    *,
    gateway: str,
    token: str,
    modules: list[str],
    concurrency: int,
    home: Path,
    hostgpu_home: Path,
) -> ServiceFile:
    command = worker_command(gateway, modules, concurrency)
    env = {"HOSTGPU_TOKEN": token, "HOSTGPU_HOME": str(hostgpu_home)}
    if platform == "darwin":
        return launchd_plist(command, env, home, hostgpu_home / "logs")
    return systemd_unit(command, env, home)


def write(service: ServiceFile) -> None:
    service.path.parent.mkdir(parents=True, exist_ok=True)
    service.path.write_text(service.content)
    # The file carries a token: readable by its owner only.
    service.path.chmod(0o600)
