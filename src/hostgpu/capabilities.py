"""What a worker can offer: its usable devices, labels, importable modules and published
functions; and a registered worker as the gateway knows it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from hostgpu.functions import FunctionOptions

DeviceKind = Literal["cuda", "mps", "mlx", "cpu"]
#: Printable ASCII: names end up in SQL, logs and terminals.
NAME_PATTERN = r"^[\x20-\x7e]+$"
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"


class Device(BaseModel):
    """One usable compute device, as the probe found it."""

    kind: DeviceKind = Field(description="cuda | mps (Metal through torch) | mlx | cpu")
    index: int | None = Field(default=None, ge=0, le=1024)
    name: str = Field(max_length=200, pattern=NAME_PATTERN)
    memory_bytes: int | None = Field(default=None, ge=0)
    compute_capability: str | None = Field(default=None, max_length=16, pattern=NAME_PATTERN)

    @property
    def torch_device(self) -> str:
        """The string to hand to ``torch.device`` (MLX uses the GPU through Metal, like mps)."""
        if self.kind == "cuda":
            return f"cuda:{self.index or 0}"
        if self.kind == "mlx":
            return "mps"
        return self.kind

    @property
    def is_accelerator(self) -> bool:
        return self.kind != "cpu"


class Capabilities(BaseModel):
    """What a worker registers with the gateway."""

    name: str = Field(max_length=200, pattern=NAME_PATTERN)
    hostname: str = Field(default="", max_length=255, pattern=r"^[\x20-\x7e]*$")
    devices: list[Device] = Field(default_factory=list, max_length=64)
    labels: dict[str, str] = Field(default_factory=dict, max_length=16)
    modules: list[str] = Field(
        default_factory=list,
        max_length=1000,
        description="modules this worker imports: the only ones whose functions it runs",
    )
    functions: dict[str, FunctionOptions] = Field(
        default_factory=dict,
        max_length=10_000,
        description="published functions (module:qualname) and their declared options",
    )
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        max_length=8,
        description="accelerator kind → why this worker cannot offer it (the probe's reason)",
    )
    concurrency: int = Field(default=1, ge=1, le=4096)
    version: str = Field(default="", max_length=64)
    serves: Literal["functions", "models"] = Field(
        default="functions",
        description='"models": a shared machine that serves model engines only',
    )


class WorkerInfo(BaseModel):
    """A registered worker as the gateway knows it."""

    id: str
    capabilities: Capabilities
    registered_at: float = Field(description="UNIX time")
    last_seen: float = Field(description="UNIX time of the last heartbeat")
    state: Literal["active", "stopped", "lost"] = Field(
        description="active: heartbeating; stopped: deregistered; lost: heartbeats stopped"
    )
    alive: bool
