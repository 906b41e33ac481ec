"""What a worker can offer: its usable devices, labels and importable modules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DeviceKind = Literal["cuda", "mps", "mlx", "cpu"]


class Device(BaseModel):
    """One usable compute device, as the probe found it."""

    kind: DeviceKind
    index: int | None = None
    name: str
    memory_bytes: int | None = None
    compute_capability: str | None = None

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

    name: str
    hostname: str = ""
    devices: list[Device] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    modules: list[str] = Field(default_factory=list)
    concurrency: int = 1
    version: str = ""
