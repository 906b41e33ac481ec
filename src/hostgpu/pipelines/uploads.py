"""An upload folder: a copyparty server whose uploads are ingested as they land.

:class:`UploadServer` runs ``python -m copyparty`` as a child process on 127.0.0.1:

- one account (``user``, with a random password made once and kept in
  ``HOME/uploads-password``, mode 0600) and one volume, the upload folder at ``/``, which that
  account may read and write; anonymous visitors get nothing. Account and volume go in a
  config file (``HOME/copyparty/copyparty.conf``, mode 0600), so the password never shows in
  the process list.
- the upload database (``-e2d``, which the hook needs) and thumbnails live under
  ``HOME/copyparty/hist`` (``--hist``), not in a ``.hist`` folder inside the uploads, so
  copyparty's own state is never ingested; its settings live under ``HOME/copyparty/config``
  (``XDG_CONFIG_HOME``), not ``~/.config``.
- after each upload copyparty runs :mod:`hostgpu.pipelines.upload_hook` (``--xau
  f,j,t60,,PYTHON,-m,hostgpu.pipelines.upload_hook``: forked, so uploads are not slowed;
  the event as one JSON argument; killed after 60 s), which posts the event to the gateway's
  ``/v1/hooks/upload`` with the token given here.

The gateway must run with ``HOSTGPU_UPLOAD_ROOT`` set to the same folder, or it refuses the
events. copyparty's output and the hook's stderr go to ``HOME/logs/copyparty.log``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from hostgpu.errors import HostGPUError
from hostgpu.processes import free_port, stop_process
from hostgpu.settings import write_private

HOOK_MODULE = "hostgpu.pipelines.upload_hook"


class UploadServer:
    """A copyparty upload server on ``root``; each finished upload is queued for ingest."""

    def __init__(
        self,
        root: Path,
        *,
        gateway: str,
        token: str,
        home: Path,
        port: int | None = None,
        user: str = "hostgpu",
    ) -> None:
        if not user or not user.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"user must be letters, digits, '-' or '_', not {user!r}")
        if "," in sys.executable:
            raise HostGPUError(
                f"copyparty cannot run a hook whose interpreter path has a comma: {sys.executable}"
            )
        self.root = Path(root).expanduser().resolve()
        self.gateway = gateway.rstrip("/")
        self.token = token
        self.home = Path(home).expanduser()
        self.port = port
        self.user = user
        self.state = self.home / "copyparty"
        self.password_path = self.home / "uploads-password"
        self.config_path = self.state / "copyparty.conf"
        self.log_path = self.home / "logs" / "copyparty.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise HostGPUError("the upload server is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def password(self) -> str:
        """The account's password, made on first use and kept in ``password_path``."""
        if self.password_path.exists():
            existing = self.password_path.read_text().strip()
            if existing:
                return existing
        password = secrets.token_urlsafe(24)
        write_private(self.password_path, password + "\n")
        return password

    def hook_command(self) -> str:
        """The ``--xau`` value: forked, JSON argument, 60 s limit, then the command line."""
        return f"f,j,t60,,{sys.executable},-m,{HOOK_MODULE}"

    def _config(self) -> str:
        # copyparty's config format; the volume path may hold characters (':') that the
        # -v SRC:DST:PERMS form cannot.
        if "\n" in str(self.root) or "  #" in str(self.root):
            raise HostGPUError(f"copyparty cannot share a folder named {str(self.root)!r}")
        return (
            "[accounts]\n"
            f"  {self.user}: {self.password}\n"
            "\n"
            "[/]\n"
            f"  {self.root}\n"
            "  accs:\n"
            f"    rw: {self.user}\n"
        )

    def command(self) -> list[str]:
        assert self.port is not None
        return [
            sys.executable,
            "-m",
            "copyparty",
            "-c",
            str(self.config_path),
            "-i",
            "127.0.0.1",
            "-p",
            str(self.port),
            "--http-only",
            "--no-crt",
            "--usernames",  # log in with user and password (HTTP basic auth works)
            "-e2d",  # the upload database; --xau needs it
            "--hist",
            str(self.state / "hist"),
            "--xau",
            self.hook_command(),
            "--name",
            "hostgpu uploads",
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOSTGPU_GATEWAY=self.gateway,
            HOSTGPU_TOKEN=self.token,
            XDG_CONFIG_HOME=str(self.state / "config"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, timeout: float = 30.0) -> UploadServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        (self.state / "config").mkdir(parents=True, exist_ok=True)
        (self.state / "hist").mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self.config_path, self._config())
        if self.port is None:
            self.port = free_port()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: Ctrl-C reaches `hostgpu up`, which then stops this cleanly.
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            cwd=self.state,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._close_log()
                raise HostGPUError(f"copyparty exited with code {code}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise HostGPUError(
                    f"copyparty did not answer on {self.url} within {timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
        return self

    def _answers(self) -> bool:
        try:
            httpx.get(f"{self.url}/", timeout=1.0)  # any HTTP answer (401 included) will do
        except httpx.HTTPError:
            return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        stop_process(self.proc, grace)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> UploadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["HOOK_MODULE", "UploadServer"]
