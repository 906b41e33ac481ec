"""The probe: which devices this process can really use, and a reason for each missing one."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field

from hostgpu.capabilities import Device
from hostgpu.devices.explain import (
    Missing,
    detect_container,
    detect_vm,
    explain_cuda,
    explain_mlx,
    explain_mps,
    mlx_has_gpu,
)
from hostgpu.devices.facts import HostFacts, TorchFacts, gather_facts
from hostgpu.errors import ConfigError, DeviceUnavailable

Requirement = Literal["mps", "cuda", "mlx", "gpu"]
REQUIREMENTS: tuple[str, ...] = ("mps", "cuda", "mlx", "gpu")


class Report(BaseModel):
    """What the probe found."""

    os: str
    os_version: str
    kernel: str = ""
    machine: str
    python: str
    container: str | None = None
    vm: str | None = Field(default=None, description="desktop engine VM, e.g. Docker Desktop")
    vm_host: str | None = Field(default=None, description="macos | windows | linux | unknown")
    vm_on_macos: bool = False
    torch_version: str | None = None
    torch_mps_built: bool | None = None
    torch_mps_available: bool | None = None
    torch_cuda_available: bool | None = None
    mlx_version: str | None = None
    mlx_gpu: bool | None = None
    cpu_cores: int
    ram_bytes: int
    devices: list[Device] = Field(default_factory=list)
    missing: list[Missing] = Field(default_factory=list)
    recorded_from: str | None = Field(
        default=None, description="HOSTGPU_PROBE_FACTS file these facts came from (tests)"
    )
    smoke: list[dict[str, object]] | None = None

    def missing_for(self, kind: str) -> Missing | None:
        return next((m for m in self.missing if m.kind == kind), None)


def _cuda_devices(torch: TorchFacts) -> list[Device]:
    return [
        Device(
            kind="cuda",
            index=index,
            name=gpu.name,
            memory_bytes=gpu.memory_bytes,
            compute_capability=f"{gpu.major}.{gpu.minor}" if gpu.major is not None else None,
        )
        for index, gpu in enumerate(torch.gpus)
    ]


def _chip(facts: HostFacts) -> str:
    return facts.cpu_model if facts.cpu_model and "Apple" in facts.cpu_model else "Apple"


def probe(*, facts: HostFacts | None = None) -> Report:
    """Probe the host (or the given recorded facts) and explain every missing accelerator."""
    if facts is None:
        facts = gather_facts()
    container = detect_container(facts)
    vm = detect_vm(facts)
    if vm and container is None:
        container = "docker" if vm.name == "Docker Desktop" else "container"
    in_mac_vm = vm is not None and vm.on_macos
    torch = facts.torch
    devices: list[Device] = []
    missing: list[Missing] = []

    # CUDA first: when a machine has both, the discrete GPU is the better default.
    cuda = _cuda_devices(torch) if torch is not None and torch.cuda_available else []
    if cuda:
        devices.extend(cuda)
    else:
        missing.append(explain_cuda(facts, container, vm))

    if torch is not None and torch.mps_available and not in_mac_vm:
        devices.append(
            Device(
                kind="mps",
                index=0,
                name=f"{_chip(facts)} GPU (Metal)",
                memory_bytes=torch.mps_recommended_memory or facts.ram_bytes or None,
            )
        )
    else:
        missing.append(explain_mps(facts, container, vm))

    if facts.system == "Darwin" and mlx_has_gpu(facts) and not in_mac_vm:
        devices.append(
            Device(
                kind="mlx",
                index=0,
                name=facts.mlx_device_name or f"{_chip(facts)} GPU (MLX)",
                memory_bytes=facts.mlx_memory_bytes or facts.ram_bytes or None,
            )
        )
    else:
        missing.append(explain_mlx(facts, container, vm))

    cpu_name = facts.cpu_model or facts.machine or "CPU"
    devices.append(Device(kind="cpu", name=cpu_name, memory_bytes=facts.ram_bytes or None))

    if facts.system == "Darwin":
        os_version = facts.mac_version or facts.kernel_release
    else:
        os_version = facts.os_release or facts.kernel_release
    return Report(
        os=facts.system,
        os_version=os_version,
        kernel=facts.kernel_release,
        machine=facts.machine,
        python=facts.python,
        container=container,
        vm=vm.name if vm else None,
        vm_host=(vm.host or "unknown") if vm else None,
        vm_on_macos=in_mac_vm,
        torch_version=torch.version if torch is not None else None,
        torch_mps_built=torch.mps_built if torch is not None else None,
        torch_mps_available=torch.mps_available if torch is not None else None,
        torch_cuda_available=torch.cuda_available if torch is not None else None,
        mlx_version=facts.mlx_version,
        mlx_gpu=mlx_has_gpu(facts) if facts.mlx_version else None,
        cpu_cores=facts.cpu_count,
        ram_bytes=facts.ram_bytes,
        devices=devices,
        missing=missing,
        recorded_from=facts.recorded_from,
    )


@lru_cache(maxsize=1)
def host_report() -> Report:
    """The probe of the real host, computed once per process."""
    return probe()


def usable_devices(*, report: Report | None = None, device: str | None = None) -> list[Device]:
    """The devices this process may use, honouring ``DEVICE`` (auto|mps|cuda|mlx|cpu).

    ``DEVICE=cpu`` gives only the CPU; ``DEVICE=mps``, ``cuda`` or ``mlx`` gives that kind
    (then the CPU) and raises :class:`DeviceUnavailable` with the reason and fix when it is
    missing — never a silent fallback.
    """
    report = report or host_report()
    if device is None:
        from hostgpu.settings import get_settings

        device = get_settings().device
    wanted = device.strip().lower() or "auto"
    cpu = [d for d in report.devices if d.kind == "cpu"]
    if wanted == "auto":
        return list(report.devices)
    if wanted == "cpu":
        return cpu
    if wanted not in ("mps", "cuda", "mlx"):
        raise ConfigError(f"DEVICE={wanted!r} is not one of auto, mps, cuda, mlx, cpu")
    chosen = [d for d in report.devices if d.kind == wanted]
    if not chosen:
        why = report.missing_for(wanted)
        detail = f": {why.reason}. Fix: {why.fix}" if why else ""
        raise DeviceUnavailable(f"DEVICE={wanted} but {wanted} is not usable here{detail}")
    return chosen + cpu


def best_device(*, report: Report | None = None, device: str | None = None) -> Device:
    """The first usable accelerator, else the CPU (``DEVICE`` is honoured)."""
    return usable_devices(report=report, device=device)[0]


def require(report: Report, what: str) -> bool:
    """Whether the report has a usable ``mps``, ``cuda``, ``mlx`` or any accelerator (``gpu``)."""
    if what == "gpu":
        return any(d.is_accelerator for d in report.devices)
    if what in ("mps", "cuda", "mlx"):
        return any(d.kind == what for d in report.devices)
    raise ValueError(f"unknown requirement {what!r}: use one of {', '.join(REQUIREMENTS)}")


def environment_key() -> str:
    """What a cached probe depends on besides the machine itself."""
    names = ("DEVICE", "CUDA_VISIBLE_DEVICES", "HOSTGPU_PROBE_FACTS", "HOSTGPU_ASSUME_CONTAINER")
    return "|".join(f"{n}={os.environ.get(n, '')}" for n in names)
