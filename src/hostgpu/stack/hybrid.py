"""The hybrid stack: services in containers, the accelerator worker native on this host.

``hostgpu stack up`` in steps (:meth:`HybridStack.up`):

1. **Docker first.** :func:`~hostgpu.stack.docker.check_docker`; any failing required check
   stops here with its reason and fix. Inside a container on a Mac's Linux VM it refuses
   (Metal is unreachable there) unless ``allow_container``.
2. **Secrets on the host, 0600, under ``HOSTGPU_HOME/stack``.** The admin token is made
   here (or taken from ``HOSTGPU_HOME/admin-token``) and mounted read-only into the gateway
   container, whose first start adopts it (``HOSTGPU_ADMIN_TOKEN_FILE``): the admin secret
   never has to leave a container. The PostgreSQL password and copyparty's account live
   next to it.
3. **Images and containers.** ``compose build`` (cached layers: seconds when nothing
   changed), then ``up`` and a wait until every container is healthy (``--wait`` on
   Compose v2, polling ``docker inspect`` on v1).
4. **Scoped tokens.** A ``worker`` token for the native worker (passed in its environment,
   never on a command line) and a ``submit`` token for copyparty's upload hook (a 0600 file
   in the folder mounted into copyparty, read at each upload). Tokens of an earlier run are
   revoked.
5. **The native worker**, pointed at the containerised gateway and Chroma server
   (``CHROMA_HOST`` / ``CHROMA_PORT``) with the upload folder as an allowed ingest root:
   - by default a detached child process (its own session, so it outlives this command);
   - with ``service``, a systemd user unit or launchd agent (``hostgpu-stack.service`` /
     ``dev.hostgpu.stack``) that the service manager starts now, at login and after a crash.
     Its token is a 0600 file (``stack/worker-token``) the unit names; the unit holds only
     settings, including the model-cache and thread variables of the shell that ran ``up``
     (a service manager starts it with a bare environment).
   Its pid, start time and log path go to ``HOSTGPU_HOME/stack/state.json``, so ``status``
   and ``down`` work from any shell.

``down`` stops the worker warm (SIGTERM, finishing running jobs, up to ``grace`` seconds;
then a second SIGTERM and a kill; a service is stopped and removed through its manager),
revokes its tokens, then removes the containers.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel, Field

from hostgpu.client import Client
from hostgpu.errors import AuthError, ConfigError, HostGPUError
from hostgpu.processes import healthy, port_free, worker_command
from hostgpu.settings import Settings, write_private
from hostgpu.stack.compose import Compose, ComposeError, Container
from hostgpu.stack.docker import ComposeInfo, DockerReport, check_docker, explain
from hostgpu.worker import service as services

SERVICES = ("gateway", "chroma", "copyparty")
POSTGRES = "postgres"
DEFAULT_PORTS = {"gateway": 8765, "chroma": 8000, "uploads": 3923}
#: Environment variables naming a ready-made image instead of building that service.
IMAGE_OVERRIDES = {
    "chroma": "HOSTGPU_CHROMA_IMAGE",
    "copyparty": "HOSTGPU_COPYPARTY_IMAGE",
    "postgres": "HOSTGPU_POSTGRES_IMAGE",
}
#: Versions of the host venv passed to the image builds (client and server of one release).
PINNED = {"chromadb": "CHROMADB_VERSION", "copyparty": "COPYPARTY_VERSION"}
UPLOADS_USER = "hostgpu"
#: The service kind of ``stack up --service`` (hostgpu-stack.service, dev.hostgpu.stack);
#: another HOSTGPU_HOME's stack gets its own (:func:`service_kind`).
SERVICE_KIND = "stack"


def service_kind(project: str) -> str:
    """``stack`` for the default project, ``stack-<hash>`` for another home's: two stacks'
    services never overwrite (or stop) each other."""
    suffix = project.removeprefix("hostgpu-")
    return SERVICE_KIND if project == "hostgpu" else f"{SERVICE_KIND}-{suffix}"


#: What a service's worker takes from the shell that ran ``stack up --service``: a service
#: manager starts it with a bare environment, where model caches, offline switches and thread
#: limits would silently differ from the foreground worker's. Names that may hold a secret
#: never travel: a service file is readable by other tools.
FORWARDED = ("HOSTGPU_", "HF_", "TRANSFORMERS_", "SENTENCE_TRANSFORMERS_", "TORCH_", "PYTORCH_")
FORWARDED_NAMES = (
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "XDG_CACHE_HOME",
    # The document pipeline's own settings (hostgpu.pipelines): device, model, batches.
    "DEVICE",
    "MODEL_NAME",
    "MODEL_PRECISION",
    "BATCH_SIZE_TEXT",
    "BATCH_SIZE_VISUAL",
)
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "DATABASE_URL", "CREDENTIAL")


class StackError(HostGPUError):
    """The hybrid stack cannot do what was asked; the message says what to do."""


class _Skip(Exception):
    """Nothing to ask the gateway (it is not running)."""


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def find_compose_file(explicit: Path | None = None) -> Path:
    """deploy/hybrid/compose.yaml: given (``--compose-file``, HOSTGPU_STACK_COMPOSE_FILE), else
    this checkout's, else ./'s."""
    import hostgpu

    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    else:
        # src/hostgpu/__init__.py → the repository root of an editable install or a clone.
        candidates.append(
            Path(hostgpu.__file__).resolve().parents[2] / "deploy/hybrid/compose.yaml"
        )
        candidates.append(Path.cwd() / "deploy/hybrid/compose.yaml")
    for candidate in candidates:
        path = candidate.expanduser().resolve()
        if path.is_file():
            return path
    raise StackError(
        f"no compose file at {', '.join(str(c) for c in candidates)}: the stack builds its "
        "gateway image from a hostgpu checkout. Run it from a clone (git clone … && pip "
        "install -e '.[ml]') or pass --compose-file deploy/hybrid/compose.yaml"
    )


def default_project(home: Path) -> str:
    """`hostgpu` for ~/.hostgpu; another HOSTGPU_HOME gets its own project (and volumes)."""
    if home.expanduser().resolve() == Path("~/.hostgpu").expanduser().resolve():
        return "hostgpu"
    return "hostgpu-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]


def host_versions() -> dict[str, str]:
    """Build arguments pinning the images to this venv's chromadb and copyparty."""
    pinned = {}
    for package, variable in PINNED.items():
        try:
            pinned[variable] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue  # the compose file's tested default applies
    return pinned


class WorkerRecord(BaseModel):
    pid: int
    create_time: float
    name: str
    log: str
    started_at: float
    #: The unit file or plist when a service manager runs the worker (``up --service``).
    service: str | None = None
    platform: str | None = None
    kind: str | None = None  # the service's kind: "stack" or "stack-<project>"
    project: str | None = None


class StackState(BaseModel):
    """What `stack up` leaves in HOSTGPU_HOME/stack/state.json for later commands."""

    project: str
    compose_file: str
    compose: ComposeInfo
    postgres: bool = False
    rootless: bool = False  # the engine maps this user to root in containers
    uploads: str
    ports: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_PORTS))
    worker: WorkerRecord | None = None
    token_ids: list[str] = Field(default_factory=list)
    started_at: float = 0.0

    def url(self, service: str) -> str:
        """Where this host reaches ``service``: its port, published on loopback only."""
        return f"http://127.0.0.1:{self.ports[service]}"

    @property
    def gateway_url(self) -> str:
        return self.url("gateway")

    @property
    def services(self) -> list[str]:
        return [*SERVICES, *([POSTGRES] if self.postgres else [])]


@dataclass
class UpOptions:
    postgres: bool = False
    uploads: Path | None = None
    ports: dict[str, int] | None = None
    imports: tuple[str, ...] = ()
    concurrency: int = 1
    build: bool = True
    allow_container: bool = False
    service: bool = False  # a systemd user unit / launchd agent instead of a child process
    timeout: float = 600.0  # for the containers to become healthy
    worker_timeout: float = 180.0  # for the worker to register


Say = Callable[[str], None]


class HybridStack:
    """The stack of one HOSTGPU_HOME: its state folder, compose project and native worker."""

    def __init__(
        self,
        settings: Settings,
        *,
        compose_file: Path | None = None,
        project: str | None = None,
        say: Say | None = None,
    ) -> None:
        self.settings = settings
        self.home = settings.home_dir
        self.dir = self.home / "stack"
        self.state_path = self.dir / "state.json"
        self._compose_file = compose_file or settings.stack_compose_file
        self._project = project or settings.stack_project
        self.say: Say = say or (lambda _message: None)

    # -- files ----------------------------------------------------------------------------
    @property
    def worker_log(self) -> Path:
        return self.home / "logs" / "stack-worker.log"

    def load_state(self) -> StackState | None:
        try:
            return StackState.model_validate_json(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    def save_state(self, state: StackState) -> None:
        write_private(self.state_path, state.model_dump_json(indent=2) + "\n")

    def admin_secret(self) -> str:
        """The stack's admin secret: kept in stack/gateway/admin-token (mounted read-only).

        Made once: from HOSTGPU_HOME/admin-token when one exists (one secret for this home),
        else fresh. HOSTGPU_HOME/admin-token is written when missing, so `hostgpu ingest`,
        `search` and `jobs` reach the stack with nothing to configure.
        """
        private_dir(self.dir)
        stack_copy = private_dir(self.dir / "gateway") / "admin-token"
        home_copy = self.settings.admin_token_path
        secret = stack_copy.read_text().strip() if stack_copy.exists() else ""
        if not secret and home_copy.exists():
            secret = home_copy.read_text().strip()
        if not secret:
            secret = f"hga_{secrets.token_urlsafe(32)}"
        write_private(stack_copy, secret + "\n")
        if not home_copy.exists():
            write_private(home_copy, secret + "\n")
        elif home_copy.read_text().strip() != secret:
            self.say(
                f"note: {home_copy} holds another gateway's token; the stack's admin token "
                f"is in {stack_copy}"
            )
        return secret

    def _secret_file(self, name: str, make: Callable[[], str]) -> str:
        path = self.dir / name
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        value = make()
        write_private(path, value + "\n")
        return value

    def uploads_password(self) -> str:
        """copyparty's password: the same file `hostgpu up --uploads` uses."""
        path = self.home / "uploads-password"
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        write_private(path, password + "\n")
        return password

    def write_copyparty_config(self, uploads: Path) -> None:
        if "\n" in str(uploads) or "  #" in str(uploads):
            raise StackError(f"copyparty cannot share a folder named {str(uploads)!r}")
        config = (
            "[accounts]\n"
            f"  {UPLOADS_USER}: {self.uploads_password()}\n"
            "\n"
            "[/]\n"
            f"  {uploads}\n"
            "  accs:\n"
            f"    rw: {UPLOADS_USER}\n"
        )
        write_private(private_dir(self.dir / "uploads") / "copyparty.conf", config)

    # -- compose --------------------------------------------------------------------------
    def project(self, state: StackState | None = None) -> str:
        if state is not None:
            return state.project
        return self._project or default_project(self.home)

    def compose_env(self, state: StackState) -> dict[str, str]:
        """What compose.yaml interpolates; passed as environment (it holds a password)."""
        # The containers that read the 0600 files run as this user, so they can. A rootless
        # engine (rootless Docker, Podman) maps this user to root inside: use root there.
        if state.rootless:
            uid, gid = 0, 0
        elif hasattr(os, "getuid"):
            uid, gid = os.getuid(), os.getgid()
        else:  # Windows: Docker Desktop's file sharing does not check owners
            uid, gid = 10001, 10001
        env = {
            "HOSTGPU_STACK_STATE": str(self.dir),
            "HOSTGPU_UPLOAD_DIR": state.uploads,
            "HOSTGPU_UID": os.environ.get("HOSTGPU_UID", str(uid)),
            "HOSTGPU_GID": os.environ.get("HOSTGPU_GID", str(gid)),
            "HOSTGPU_STACK_GATEWAY_PORT": str(state.ports["gateway"]),
            "HOSTGPU_STACK_CHROMA_PORT": str(state.ports["chroma"]),
            "HOSTGPU_STACK_UPLOADS_PORT": str(state.ports["uploads"]),
            **host_versions(),
        }
        if state.postgres:
            password = self._secret_file("postgres-password", lambda: secrets.token_urlsafe(24))
            env["HOSTGPU_POSTGRES_PASSWORD"] = password
            env["HOSTGPU_STACK_DATABASE_URL"] = (
                f"postgresql://hostgpu:{password}@postgres:5432/hostgpu"
            )
        return env

    def compose(self, state: StackState, *, env: dict[str, str] | None = None) -> Compose:
        return Compose(
            state.compose,
            [Path(state.compose_file)],
            state.project,
            env=env if env is not None else self.compose_env(state),
            profiles=[POSTGRES] if state.postgres else [],
        )

    # -- up -------------------------------------------------------------------------------
    def check(self, *, allow_container: bool = False) -> DockerReport:
        report = check_docker()
        blocking = [c for c in report.failures() if c.required]
        if allow_container:
            blocking = [c for c in blocking if c.name != "container"]
        if blocking:
            raise StackError("Docker is not ready for the stack:\n" + explain(report))
        return report

    def up(self, options: UpOptions) -> StackState:
        t0 = time.monotonic()
        if options.service:  # before anything starts: a stack with no way to run its worker
            self._check_service_manager()
        docker = self.check(allow_container=options.allow_container)
        assert docker.compose is not None
        self.say(
            f"docker: {docker.engine} {docker.server_version}, compose {docker.compose.version}"
        )

        previous = self.load_state()
        uploads = options.uploads or (Path(previous.uploads) if previous else self.home / "uploads")
        uploads = uploads.expanduser().resolve()
        uploads.mkdir(parents=True, exist_ok=True)
        ports = {**DEFAULT_PORTS, **(previous.ports if previous else {}), **(options.ports or {})}
        state = StackState(
            project=self.project(previous),
            compose_file=str(find_compose_file(self._compose_file)),
            compose=docker.compose,
            postgres=options.postgres,
            rootless=docker.rootless,
            uploads=str(uploads),
            ports=ports,
            worker=previous.worker if previous else None,
            token_ids=previous.token_ids if previous else [],
            started_at=time.time(),
        )
        compose = self.compose(state)
        existing = compose.containers()
        if previous is not None and existing and previous.postgres != options.postgres:
            raise StackError(
                f"the stack is up {'with' if previous.postgres else 'without'} --postgres: "
                "run `hostgpu stack down` first to switch"
            )
        if not existing:
            self._check_ports(ports)
        if previous is not None and (previous.ports, previous.uploads) != (ports, str(uploads)):
            # A running worker points at the old ports and folder: replace it.
            self.say(f"worker: {self.stop_worker(previous)} (new ports or upload folder)")
            state.worker = None
        elif (
            previous is not None
            and previous.worker is not None
            and bool(previous.worker.service) != options.service
        ):
            why = "a service replaces it" if options.service else "no longer a service"
            self.say(f"worker: {self.stop_worker(previous)} ({why})")
            state.worker = None

        self.admin_secret()
        self.write_copyparty_config(uploads)
        self.save_state(state)  # from here on, `stack down` can clean up whatever follows

        services = state.services
        t = time.monotonic()
        self._images(compose, services, build=options.build)
        self.say(f"images ready ({time.monotonic() - t:.1f} s)")
        t = time.monotonic()
        compose.up(services, timeout=options.timeout)
        self._wait_gateway(state.gateway_url)
        self.say(f"containers healthy: {', '.join(services)} ({time.monotonic() - t:.1f} s)")

        t = time.monotonic()
        worker = state.worker if self._worker_process(state.worker) else None
        if worker is None:
            worker_token = self._tokens(state)
            self.save_state(state)
            state.worker = self._start_worker(state, worker_token, options)
            how = f"service {state.worker.service}, " if state.worker.service else ""
            self.say(
                f"worker {state.worker.name} ({how}pid {state.worker.pid}) registered "
                f"({time.monotonic() - t:.1f} s)"
            )
        else:
            self.say(f"worker already running (pid {worker.pid})")
        self.save_state(state)
        self.settings.gateway_url_path.write_text(state.gateway_url + "\n")
        self.say(f"stack up in {time.monotonic() - t0:.1f} s")
        return state

    def _check_ports(self, ports: dict[str, int]) -> None:
        taken = [
            f"{name} {port}" for name, port in ports.items() if not port_free("127.0.0.1", port)
        ]
        if taken:
            options = ", ".join(f"--{name.split()[0]}-port" for name in taken)
            raise StackError(
                f"port(s) in use on 127.0.0.1: {', '.join(taken)} (another gateway, Chroma or "
                f"upload server?): stop what holds them, or choose others with {options}"
            )

    def _images(self, compose: Compose, services: list[str], *, build: bool) -> None:
        """Build the services made here; use (pull if missing) the images named instead."""
        to_build = [s for s in services if not os.environ.get(IMAGE_OVERRIDES.get(s, ""), "")]
        for service in services:
            image = os.environ.get(IMAGE_OVERRIDES.get(service, ""), "")
            if image and compose.docker("image", "inspect", image).returncode != 0:
                self.say(f"pulling {image} for {service}")
                pulled = compose.docker("pull", image, timeout=1800)
                if pulled.returncode != 0:
                    raise StackError(
                        f"cannot pull {image} ({IMAGE_OVERRIDES[service]}): "
                        f"{pulled.stderr.strip()[-300:]}\nfix: unset {IMAGE_OVERRIDES[service]} to "
                        "build the service from BASE_IMAGE instead"
                    )
        if not build:
            missing = [
                s
                for s in to_build
                if compose.docker("image", "inspect", self._image_name(s)).returncode != 0
            ]
            if not missing:
                return
            to_build = missing
        self.say(
            f"building {', '.join(to_build)} (BASE_IMAGE="
            f"{os.environ.get('BASE_IMAGE', 'python:3.11-slim')})"
        )
        try:
            compose.build(to_build)
        except ComposeError as exc:
            raise StackError(
                f"{exc}\nfix: the builds need the package index (and BASE_IMAGE: "
                f"{os.environ.get('BASE_IMAGE', 'python:3.11-slim')}) to be reachable; "
                "see the output above"
            ) from None

    @staticmethod
    def _image_name(service: str) -> str:
        return f"hostgpu/{service}:local"

    def _wait_gateway(self, url: str, timeout: float = 60.0) -> None:
        """The gateway answers through the published port (forwarding may lag the health)."""
        deadline = time.monotonic() + timeout
        while not healthy(url, timeout=2):
            if time.monotonic() > deadline:
                raise StackError(
                    f"the gateway container is healthy but {url} does not answer from this "
                    "host: is another process holding the port, or does the engine not "
                    "forward published ports to 127.0.0.1?"
                )
            time.sleep(0.5)

    def _tokens(self, state: StackState) -> str:
        """Fresh worker and submit tokens (earlier ones revoked); returns the worker token."""
        admin = self.admin_secret()
        with Client(state.gateway_url, admin) as api:
            try:
                known = {t.id for t in api.list_tokens()}
            except AuthError:
                raise StackError(
                    f"the gateway refuses the stack's admin token ({self.dir}/gateway/"
                    "admin-token): its database was made with another one. Run `hostgpu stack "
                    "down --volumes` to start with an empty database, or put that database's "
                    "admin token in the file"
                ) from None
            for token_id in state.token_ids:
                if token_id in known:
                    api.revoke_token(token_id)
            worker = api.create_token(f"stack worker ({socket.gethostname()})", "worker")
            submit = api.create_token("stack uploads hook", "submit")
        write_private(private_dir(self.dir / "uploads") / "submit-token", submit.token + "\n")
        state.token_ids = [worker.id, submit.id]
        return worker.token

    # -- the native worker ----------------------------------------------------------------
    def worker_settings(self, state: StackState) -> dict[str, str]:
        """What points the worker at the stack (no secret: a service file holds these)."""
        roots = [r for r in self.settings.ingest_roots.split(os.pathsep) if r]
        if state.uploads not in roots:
            roots.append(state.uploads)
        return {
            "HOSTGPU_HOME": str(self.home),
            "HOSTGPU_GATEWAY": state.gateway_url,
            "CHROMA_HOST": "127.0.0.1",
            "CHROMA_PORT": str(state.ports["chroma"]),
            "HOSTGPU_UPLOAD_ROOT": state.uploads,
            "HOSTGPU_INGEST_ROOTS": os.pathsep.join(roots),
            "PYTHONUNBUFFERED": "1",
        }

    def worker_env(self, state: StackState, token: str) -> dict[str, str]:
        """The foreground worker's environment: this shell's, pointed at the stack."""
        env = {**os.environ}
        for name in ("HOSTGPU_DATABASE_URL", "HOSTGPU_ADMIN_TOKEN_FILE", "HOSTGPU_TOKEN_FILE"):
            env.pop(name, None)
        env.update(self.worker_settings(state))
        env["HOSTGPU_TOKEN"] = token  # the environment, never the command line
        return env

    def service_env(self, state: StackState) -> dict[str, str]:
        """The service's settings: this shell's model and thread variables, no secret."""
        forwarded = {
            name: value
            for name, value in os.environ.items()
            if (name.startswith(FORWARDED) or name in FORWARDED_NAMES)
            and not any(word in name for word in SECRET_WORDS)
            and "\n" not in value
        }
        return {**forwarded, **self.worker_settings(state)}

    def _start_worker(self, state: StackState, token: str, options: UpOptions) -> WorkerRecord:
        name = f"{socket.gethostname()}-stack"
        extra = ["--name", name, "--label", f"stack={state.project}"]
        if options.allow_container:
            extra.append("--allow-container")
        argv = worker_command(state.gateway_url, options.imports, options.concurrency, *extra)
        self.worker_log.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        with open(self.worker_log, "ab") as log:
            how = "service" if options.service else "worker"
            log.write(f"--- hostgpu stack up: {how} starting at {time.ctime()}\n".encode())
        if options.service:
            record = self._start_service(state, token, argv, name, started)

            def failure() -> str | None:
                return self._service_failure(record)
        else:
            with open(self.worker_log, "ab") as log:
                # Its own session: it outlives this command and a Ctrl-C in this terminal.
                proc = subprocess.Popen(
                    argv,
                    env=self.worker_env(state, token),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=self.home,
                )
            record = WorkerRecord(
                pid=proc.pid,
                create_time=psutil.Process(proc.pid).create_time(),
                name=name,
                log=str(self.worker_log),
                started_at=started,
            )

            def failure() -> str | None:
                code = proc.poll()
                return None if code is None else f"the native worker exited with code {code}"

        state.worker = record
        self.save_state(state)
        self._wait_registered(state, token, record, failure, options.worker_timeout)
        if record.service:  # the manager's process, found by its stack label
            found = self._worker_process(record)
            if found is not None:
                record.pid, record.create_time = found.pid, found.create_time()
        return record

    def _wait_registered(
        self,
        state: StackState,
        token: str,
        record: WorkerRecord,
        failure: Callable[[], str | None],
        timeout: float,
    ) -> None:
        """Until the gateway lists the worker with its functions; its log tail if it fails."""
        deadline = time.monotonic() + timeout
        with Client(state.gateway_url, token) as api:
            while True:
                problem = failure()
                if problem is not None:
                    raise StackError(f"{problem}:\n{self.log_tail(self.worker_log)}")
                mine = [
                    w
                    for w in api.workers(alive=True)
                    if w.capabilities.name == record.name
                    and w.registered_at >= record.started_at - 5
                    and w.capabilities.functions
                ]
                if mine:
                    return
                if time.monotonic() > deadline:
                    raise StackError(
                        f"the native worker did not register within {timeout:.0f} s:"
                        f"\n{self.log_tail(self.worker_log)}"
                    )
                time.sleep(0.3)

    # -- the worker as a service ------------------------------------------------------------
    @staticmethod
    def _platform() -> str:
        return "darwin" if sys.platform == "darwin" else "linux"

    def _check_service_manager(self) -> None:
        """Fail before any container starts when no service manager would take the unit."""
        if sys.platform not in ("darwin", "linux"):
            raise StackError(
                "--service needs launchd (macOS) or systemd (Linux): run `hostgpu stack up` "
                "without it for a worker process"
            )
        plat = self._platform()
        mgr = services.manager(plat, services.service_path(plat, Path.home(), SERVICE_KIND))
        assert mgr.reload is not None
        ran = services.run_manager(mgr.reload)
        if ran is None:
            raise StackError(
                f"--service needs {mgr.tool}, which is not on PATH: run `hostgpu stack up` "
                "without --service for a worker process"
            )
        if ran[0] != 0:
            fix = (
                "log in to a desktop session"
                if plat == "darwin"
                else "log in with a systemd user session (`loginctl enable-linger $USER` "
                "keeps one after you log out)"
            )
            raise StackError(
                f"{shlex.join(mgr.reload)} failed: {ran[1] or 'no output'}\nfix: {fix}, or run "
                "`hostgpu stack up` without --service for a worker process"
            )

    def _start_service(
        self, state: StackState, token: str, argv: list[str], name: str, started: float
    ) -> WorkerRecord:
        """Write the token file and the unit (or plist), then have the manager start it."""
        plat = self._platform()
        kind = service_kind(state.project)
        token_file = self.dir / "worker-token"
        write_private(token_file, token + "\n")
        unit = services.command_service(
            plat,
            argv,
            token_file,
            Path.home(),
            self.home,
            kind,
            env=self.service_env(state),
            log=self.worker_log,
        )
        mgr = services.manager(plat, unit.path, kind)
        # One still loaded (crash-looping, or left by a failed `up`) would keep its old token
        # and settings: `enable --now` does not restart it, `bootstrap` refuses it.
        services.run_manager(mgr.unload)
        services.write(unit)
        for step in (mgr.reload, mgr.load):
            if step is None:
                continue
            ran = services.run_manager(step)
            if ran is None or ran[0] != 0:
                raise StackError(
                    f"{shlex.join(step)} failed: {ran[1] if ran else 'not on PATH'}\n"
                    f"the unit is {unit.path}; `hostgpu stack down` removes it"
                )
        self.say(f"service {unit.path.name} started by {mgr.tool}")
        return WorkerRecord(
            pid=0,
            create_time=0.0,
            name=name,
            log=str(self.worker_log),
            started_at=started,
            service=str(unit.path),
            platform=plat,
            kind=kind,
            project=state.project,
        )

    def _service_failure(self, record: WorkerRecord) -> str | None:
        """Why the service is not running (None while the manager says it runs)."""
        assert record.service is not None and record.platform is not None
        mgr = services.manager(record.platform, Path(record.service), record.kind or SERVICE_KIND)
        ran = services.run_manager(mgr.state)
        if ran is not None and ran[0] == 0:
            return None
        said = ran[1] if ran else f"{mgr.tool} not on PATH"
        return f"the worker service is not running ({shlex.join(mgr.state)}: {said or '-'})"

    def _remove_service(self, record: WorkerRecord) -> str:
        """Stop the service through its manager (a warm stop), remove its unit and token."""
        assert record.service is not None and record.platform is not None
        path = Path(record.service)
        mgr = services.manager(record.platform, path, record.kind or SERVICE_KIND)
        ran = services.run_manager(mgr.unload)
        if ran is not None and ran[0] != 0 and path.exists():
            # Deleting the file of a unit still loaded would leave a worker nobody can
            # stop with hostgpu (launchd's KeepAlive restarts it).
            return (
                f"could not stop the service ({ran[1] or 'no output'}): {path} kept; stop it "
                f"with `{shlex.join(mgr.unload)}`, then run `hostgpu stack down` again"
            )
        path.unlink(missing_ok=True)
        if mgr.reload is not None:
            services.run_manager(mgr.reload)
        (self.dir / "worker-token").unlink(missing_ok=True)
        if ran is None:
            return f"service file removed ({mgr.tool} not on PATH)"
        return "service stopped and removed" if ran[0] == 0 else f"service removed ({ran[1]})"

    def _worker_process(self, record: WorkerRecord | None) -> psutil.Process | None:
        """The recorded worker's process, if it still runs (and is not a recycled pid).

        A service's manager may have restarted it under another pid: that one is found by
        its ``--label stack=PROJECT`` argument.
        """
        if record is None:
            return None
        try:
            proc = psutil.Process(record.pid)
            if (
                abs(proc.create_time() - record.create_time) <= 1.0
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                return proc
        except psutil.Error:
            pass
        if record.service is None:
            return None
        label = f"stack={record.project or self.project()}"
        mine = os.getuid() if hasattr(os, "getuid") else None
        for candidate in psutil.process_iter(["cmdline", "status", "uids"]):
            cmdline = candidate.info["cmdline"] or []
            uids = candidate.info["uids"]
            if (
                label in cmdline
                and "worker" in cmdline
                and candidate.info["status"] != psutil.STATUS_ZOMBIE
                and (mine is None or (uids is not None and uids.real == mine))
            ):
                return candidate
        return None

    def stop_worker(self, state: StackState, *, grace: float = 30.0) -> str:
        """Warm stop: SIGTERM and wait; then a second SIGTERM (cold) and, last, a kill.

        A service is stopped by its manager (which would restart a worker killed behind its
        back), with the unit's own grace, and removed; a process it leaves is then stopped.
        """
        removed = None
        if state.worker is not None and state.worker.service is not None:
            removed = self._remove_service(state.worker)
        proc = self._worker_process(state.worker)
        if proc is None:
            return removed or "not running"
        steps = [
            (signal.SIGTERM, grace, "stopped"),
            (signal.SIGTERM, 10.0, "stopped cold"),
            (signal.SIGKILL, 10.0, "killed"),
        ]
        for sig, wait, outcome in steps:
            outcome = f"{removed}; its process {outcome}" if removed else outcome
            try:
                proc.send_signal(sig)
                proc.wait(timeout=wait)
                return outcome
            except psutil.TimeoutExpired:
                continue
            except psutil.NoSuchProcess:
                return outcome
        raise StackError(f"the worker (pid {proc.pid}) did not exit even after SIGKILL")

    # -- down, status, logs ---------------------------------------------------------------
    def down(self, *, volumes: bool = False, grace: float = 30.0) -> dict[str, Any]:
        state = self.load_state()
        if state is None:
            raise StackError(
                f"no stack state in {self.state_path}: nothing was started from this "
                "HOSTGPU_HOME (another one? set HOSTGPU_HOME)"
            )
        t = time.monotonic()
        worker = self.stop_worker(state, grace=grace)
        self.say(f"worker: {worker} ({time.monotonic() - t:.1f} s)")
        if state.token_ids:
            try:
                with Client(state.gateway_url, self.admin_secret(), timeout=5) as api:
                    for token_id in state.token_ids:
                        api.revoke_token(token_id)
            except HostGPUError:
                pass  # the gateway may be gone already; its volume keeps revoked-or-not tokens
        t = time.monotonic()
        compose = self.compose(state)
        compose.down(volumes=volumes, profiles=[POSTGRES])
        left = compose.containers()
        if left:
            raise StackError(f"containers left after down: {', '.join(c.name for c in left)}")
        self.say(
            f"containers removed{' with their volumes' if volumes else ''} "
            f"({time.monotonic() - t:.1f} s)"
        )
        gateway_url = self.settings.gateway_url_path
        if gateway_url.exists() and gateway_url.read_text().strip() == state.gateway_url:
            gateway_url.unlink()
        state.worker = None
        state.token_ids = []
        self.save_state(state)
        return {"worker": worker, "volumes_removed": volumes}

    def status(self) -> dict[str, Any]:
        """Containers, the worker (process and what the gateway knows), the queue."""
        state = self.load_state()
        if state is None:
            raise StackError(
                f"no stack state in {self.state_path}: start it with `hostgpu stack up`"
            )
        compose = self.compose(state)
        containers = {c.service: c for c in compose.containers()}
        rows = []
        for service in state.services:
            found: Container | None = containers.get(service)
            row: dict[str, Any] = {
                "service": service,
                "state": "missing",
                "health": None,
                "ports": [],
            }
            if found is not None:
                row.update(found.as_dict())
            rows.append(row)
        proc = self._worker_process(state.worker)
        unit = state.worker.service if state.worker else None
        worker: dict[str, Any] = {
            "pid": proc.pid if proc is not None else (state.worker.pid if state.worker else None),
            "running": proc is not None,
            "name": state.worker.name if state.worker else None,
            "log": str(self.worker_log),
            "service": unit,  # the unit or plist, when a service manager runs it
            "registered": False,
        }
        if state.worker is not None and unit is not None:
            worker["service_failure"] = self._service_failure(state.worker)
            worker["running"] = proc is not None and worker["service_failure"] is None
        queue: dict[str, int] | None = None
        gateway_error = None
        gateway_up = any(r["service"] == "gateway" and r["state"] == "running" for r in rows)
        if not gateway_up:
            gateway_error = "the gateway container is not running: `hostgpu stack up` starts it"
        try:
            if not gateway_up:
                raise _Skip
            with Client(state.gateway_url, self.admin_secret(), timeout=5) as api:
                queue = api.summary().counts
                if state.worker is not None:
                    mine = [
                        w
                        for w in api.workers()
                        if w.capabilities.name == state.worker.name
                        and w.registered_at >= state.worker.started_at - 5
                    ]
                    if mine:
                        latest = max(mine, key=lambda w: w.registered_at)
                        worker.update(
                            registered=True,
                            alive=latest.alive,
                            id=latest.id,
                            devices=[f"{d.kind}:{d.name}" for d in latest.capabilities.devices],
                            last_heartbeat_s=round(max(0.0, time.time() - latest.last_seen), 1),
                        )
        except _Skip:
            pass
        except HostGPUError as exc:
            gateway_error = str(exc)
        healthy = (
            all(r["state"] == "running" and r["health"] in (None, "healthy") for r in rows)
            and worker["running"]
            and bool(worker.get("alive"))
        )
        return {
            "project": state.project,
            "healthy": healthy,
            "gateway": state.gateway_url,
            "chroma": state.url("chroma"),
            "uploads": {
                "url": state.url("uploads"),
                "folder": state.uploads,
                "user": UPLOADS_USER,
                "password_file": str(self.home / "uploads-password"),
            },
            "postgres": state.postgres,
            "containers": rows,
            "worker": worker,
            "queue": queue,
            "gateway_error": gateway_error,
        }

    def logs(self, service: str | None = None, *, tail: int = 200) -> str:
        state = self.load_state()
        if state is None:
            raise StackError(f"no stack state in {self.state_path}: nothing to show")
        if service is not None and service != "worker" and service not in state.services:
            raise ConfigError(
                f"unknown service {service!r}: use one of {', '.join([*state.services, 'worker'])}"
            )
        parts = []
        if service != "worker":
            parts.append(self.compose(state).logs([service] if service else [], tail=tail))
        if service in (None, "worker"):
            parts.append(
                f"--- worker ({self.worker_log}) ---\n{self.log_tail(self.worker_log, tail)}"
            )
        return "\n".join(p.rstrip() for p in parts if p.strip()) + "\n"

    @staticmethod
    def log_tail(path: Path, lines: int = 40) -> str:
        if not path.exists():
            return "(no log yet)"
        text = path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def dump(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


__all__ = [
    "DEFAULT_PORTS",
    "HybridStack",
    "StackError",
    "StackState",
    "UpOptions",
    "find_compose_file",
]
