"""What a worker can offer: its usable devices, labels, importable modules and published
functions; and a registered worker as the gateway knows it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from hostgpu.functions import FunctionOptions
from hostgpu.requirements import (
    MODULE_PATTERN,
    NOT_BOOL,
    FunctionPath,
    LabelKey,
    LabelValue,
    ModuleName,
    Text,
    closed_keys,
)

DeviceKind = Literal["cuda", "mps", "mlx", "cpu"]
#: Printable ASCII: names end up in SQL, logs and terminals.
NAME_PATTERN = r"^[\x20-\x7e]+$"
__all__ = ["MODULE_PATTERN", "NAME_PATTERN", "Capabilities", "Device", "WorkerInfo"]


class Device(BaseModel):
    """One usable compute device, as the probe found it."""

    kind: DeviceKind = Field(description="cuda | mps (Metal through torch) | mlx | cpu")
    index: Annotated[int, Field(ge=0, le=1024), NOT_BOOL] | None = None
    name: str = Field(max_length=200, pattern=NAME_PATTERN)
    memory_bytes: Annotated[int, Field(ge=0), NOT_BOOL] | None = None
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
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=16, json_schema_extra=closed_keys
    )
    modules: list[ModuleName] = Field(
        default_factory=list,
        max_length=1000,
        description="modules this worker imports: the only ones whose functions it runs",
    )
    functions: dict[FunctionPath, FunctionOptions] = Field(
        default_factory=dict,
        max_length=10_000,
        json_schema_extra=closed_keys,
        description="published functions (module:qualname) and their declared options",
    )
    unavailable: dict[Annotated[str, Field(pattern=r"^[\x20-\x7e]{1,16}$")], Text] = Field(
        default_factory=dict,
        max_length=8,
        json_schema_extra=closed_keys,
        description="accelerator kind → why this worker cannot offer it (the probe's reason)",
    )
    concurrency: Annotated[int, Field(ge=1, le=4096), NOT_BOOL] = 1
    version: str = Field(default="", max_length=64, pattern=r"^[\x20-\x7e]*$")
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
    state: Literal["active", "draining", "stopped", "lost"] = Field(
        description="active: heartbeating; draining: stopping, finishing its jobs, leasing "
        "none; stopped: deregistered; lost: heartbeats stopped"
    )
    alive: bool
