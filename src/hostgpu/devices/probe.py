"""The probe: which devices this process can really use, and a reason for each missing one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
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


def _cache_key() -> str:
    """What a probe's answer depends on, short of the hardware: the interpreter, the torch and
    mlx builds, the boot (drivers load at boot) and the environment variables it reads."""
    from importlib import metadata

    versions = []
    for dist in ("torch", "mlx"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=-")
    try:
        import psutil

        boot = str(int(psutil.boot_time()))
    except Exception:  # no psutil: the cache expires by age only
        boot = "?"
    names = (
        "DEVICE",
        "HOSTGPU_DEVICE",
        "CUDA_VISIBLE_DEVICES",
        "HOSTGPU_PROBE_FACTS",
        "HOSTGPU_ASSUME_CONTAINER",
    )
    env = [f"{n}={os.environ.get(n, '')}" for n in names]
    return "|".join([sys.executable, *versions, f"boot={boot}", *env])


def cached_report(cache: Path, *, max_age_s: float = 24 * 3600) -> Report:
    """The host's probe without importing torch here: read from ``cache`` when it is fresh,
    else probed in a short-lived subprocess and cached.

    A worker's parent process only routes jobs; importing torch just to list devices would
    cost it ~250 MiB and a second at every start.
    """
    key = _cache_key()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and time.time() - float(cached["at"]) < max_age_s:
            return Report.model_validate(cached["report"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    code = (
        "import sys; from hostgpu.devices import probe; sys.stdout.write(probe().model_dump_json())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
        )
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"the accelerator probe failed: {exc.stderr.strip()[-2000:]}") from None
    report = Report.model_validate_json(out.stdout)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "at": time.time(), "report": report.model_dump()}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home: probe again next time
    return report
