"""Real Ray nodes on this machine, started with ``hostgpu ray start --block``: for the tests
and the benchmark (a user runs the command).

Every node binds loopback addresses: Ray turns ``--node-ip-address 127.0.0.1`` into the
machine's external address (``ray._private.services.resolve_ip_for_localhost``), so the nodes
use ``127.0.0.2``, which Ray leaves alone and Linux routes to the loopback device. Each node
is its own process group, so stopping one (SIGTERM to ``ray start``) or killing one (SIGKILL
to the group: raylet, agents and workers) touches nothing else on the machine; ``ray stop``
would end every Ray process of every user.

Every node gets ``RAY_AUTH_MODE=disabled`` (a loopback cluster for tests and benchmarks):
left unset, ``ray start --head`` turns token auth on when ``~/.ray/auth_token`` exists (any
earlier ``ray.init()`` on the machine writes one) while ``ray start --address`` does not, so
a joining node would be refused by its own head, and a driver that imported Ray before
being told the mode cannot change it (Ray reads it at import).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostgpu.processes import free_port, hostgpu_command

#: The loopback address Ray keeps as given (see the module docstring).
LOOPBACK = "127.0.0.2"


@dataclass
class RayNode:
    """One Ray node process group; ``head`` or joining ``address``."""

    home: Path
    head: bool = True
    address: str | None = None  # the head's GCS address, for a joining node
    num_cpus: int = 1
    facts: Path | None = None  # HOSTGPU_PROBE_FACTS: advertise a recorded machine
    labels: str = ""
    env_extra: dict[str, str] = field(default_factory=dict)
    pythonpath: str = ""
    port: int = field(default_factory=free_port)  # the head's GCS port
    client_port: int = field(default_factory=free_port)  # the head's Ray Client port
    node_manager_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def client_address(self) -> str:
        return f"ray://{LOOPBACK}:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.home / f"ray-node-{self.node_manager_port}.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTGPU_", "RAY_"))}
        env.update(
            HOSTGPU_HOME=str(self.home),
            PYTHONPATH=os.pathsep.join(p for p in (self.pythonpath, env.get("PYTHONPATH")) if p),
            HF_HUB_OFFLINE="1",
            RAY_USAGE_STATS_ENABLED="0",
            # SIGTERM stops the node now instead of draining it for 30 s.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            RAY_AUTH_MODE="disabled",  # the same on every node: see the module docstring
        )
        if self.facts is not None:
            env["HOSTGPU_PROBE_FACTS"] = str(self.facts)
        if self.labels:
            env["HOSTGPU_LABELS"] = self.labels
        env.update(self.env_extra)
        return env

    def command(self) -> list[str]:
        ports = [
            "--node-manager-port",
            str(self.node_manager_port),
            "--object-manager-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
        ]
        args = hostgpu_command("ray", "start", "--block", "--node-ip-address", LOOPBACK)
        if self.head:
            args += [
                "--head",
                "--port",
                str(self.port),
                "--ray-client-server-port",
                str(self.client_port),
                "--include-dashboard",
                "false",
            ]
        else:
            assert self.address, "a joining node needs the head's address"
            args += ["--address", self.address]
        return [
            *args,
            *ports,
            "--num-cpus",
            str(self.num_cpus),
            "--disable-usage-stats",
            "--temp-dir",
            str(self.home / "ray"),
        ]

    def launch(self) -> RayNode:
        """Start the node's ``ray start --block`` without waiting for it (a joining node may
        be launched right after its head: ``ray start`` waits for the head's GCS)."""
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: see the module docstring
        )
        return self

    def wait(self, timeout: float = 120.0) -> RayNode:
        """Wait until ``ray start`` says the node runs."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        while "block forever" not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray node exited: {self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"ray node did not start: {self.log_text()}")
            time.sleep(0.2)
        return self

    def start(self, timeout: float = 120.0) -> RayNode:
        return self.launch().wait(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the node's whole process group, as a power cut would."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to ``ray start`` (it stops its processes), then SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        self.kill()
