"""Everything the accelerator probe reads from the real system, gathered in one place.

:meth:`HostFacts.gather` is the only code that touches the host (files, ``sysctl``, torch,
mlx); the rest of the probe is a pure function of the facts. Tests build facts directly.

The one seam for what cannot exist here (a Mac's Metal on a Linux test machine): when
``HOSTGPU_PROBE_FACTS`` names a JSON file of recorded facts, :func:`gather_facts` returns
those instead of reading the host, and says so in the log. Workers, doctor and the Ray
integration all probe through :func:`gather_facts`, so one recorded file makes a process
advertise what that machine had.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

log = logging.getLogger("hostgpu.devices")

PROBE_FACTS_ENV = "HOSTGPU_PROBE_FACTS"


@dataclass(frozen=True)
class GpuFacts:
    """One CUDA device as ``torch.cuda.get_device_properties`` describes it."""

    name: str
    memory_bytes: int | None = None
    major: int | None = None
    minor: int | None = None


@dataclass(frozen=True)
class TorchFacts:
    """What an installed torch says about its build and the devices it sees."""

    version: str = "unknown"
    cuda_version: str | None = None  # torch.version.cuda: None for CPU-only builds
    has_mps_backend: bool = True  # torch.backends.mps exists (torch >= 1.12)
    mps_built: bool = False
    mps_available: bool = False
    mps_recommended_memory: int | None = None  # torch.mps.recommended_max_memory()
    cuda_available: bool = False
    gpus: tuple[GpuFacts, ...] = ()
    cuda_error: str | None = None  # reading the devices failed although CUDA is available

    @classmethod
    def read(cls, torch: Any) -> TorchFacts:
        """Read a torch module (or anything shaped like one)."""
        mps = getattr(getattr(torch, "backends", None), "mps", None)
        cuda_available = bool(_safe(torch.cuda.is_available, False))
        gpus: list[GpuFacts] = []
        cuda_error = None
        if cuda_available:
            try:
                for index in range(int(torch.cuda.device_count())):
                    props = torch.cuda.get_device_properties(index)
                    memory = getattr(props, "total_memory", None)
                    gpus.append(
                        GpuFacts(
                            name=str(getattr(props, "name", f"CUDA device {index}")),
                            memory_bytes=int(memory) if memory is not None else None,
                            major=getattr(props, "major", None),
                            minor=getattr(props, "minor", None),
                        )
                    )
            except Exception as exc:
                cuda_error = str(exc)
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        mps_available = bool(_safe(mps.is_available, False)) if mps is not None else False
        memory = _safe(recommended) if recommended is not None and mps_available else None
        return cls(
            version=str(getattr(torch, "__version__", "unknown")),
            cuda_version=getattr(getattr(torch, "version", None), "cuda", None),
            has_mps_backend=mps is not None,
            mps_built=bool(_safe(mps.is_built, False)) if mps is not None else False,
            mps_available=mps_available,
            mps_recommended_memory=int(memory) if memory else None,
            cuda_available=cuda_available,
            gpus=tuple(gpus),
            cuda_error=cuda_error,
        )


def assume_container() -> bool:
    """``HOSTGPU_ASSUME_CONTAINER``: treat this process as containerised (for runtimes the
    container checks do not recognise)."""
    return os.environ.get("HOSTGPU_ASSUME_CONTAINER", "").lower() in ("1", "true", "yes")


def _safe(call: Any, default: Any = None) -> Any:
    try:
        return call()
    except Exception:
        return default


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def _ram_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # psutil missing or unsupported platform
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 0


def _cpu_model_linux(cpuinfo: str | None) -> str | None:
    if not cpuinfo:
        return None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
        if match and match.group(1).strip():
            return match.group(1).strip()
    return None


def import_torch() -> tuple[Any | None, str | None]:
    """Import torch quietly; (torch, None), (None, None) when it is absent, or (None, why) when
    it is broken."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
    except ModuleNotFoundError:
        return None, None
    except Exception as exc:  # a broken install (missing CUDA libraries, bad wheel)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return torch, None


def _read_torch() -> tuple[TorchFacts | None, str | None]:
    """Import torch and read it; (facts, None), or (None, why) when it is absent or broken."""
    torch, error = import_torch()
    return (None if torch is None else TorchFacts.read(torch)), error


class _MlxFacts(TypedDict, total=False):
    """HostFacts' fields about MLX; one left out keeps its default (None)."""

    mlx_version: str
    mlx_metal: bool
    mlx_device_name: str | None
    mlx_memory_bytes: int | None
    mlx_default_device: str | None


def _mlx_info() -> _MlxFacts:
    """Version, Metal availability, GPU name, memory bytes and default device of an installed
    MLX; nothing when MLX is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlx.core as mx
    except Exception:
        return {}
    try:
        from importlib.metadata import version

        mlx_version = version("mlx")
    except Exception:
        mlx_version = str(getattr(mx, "__version__", "unknown"))
    facts = _MlxFacts(
        mlx_version=mlx_version, mlx_default_device=str(_safe(mx.default_device, "")) or None
    )
    try:
        facts["mlx_metal"] = metal = bool(mx.metal.is_available())
        if metal:
            info_fn = getattr(mx, "device_info", None) or mx.metal.device_info
            info = dict(info_fn())
            facts["mlx_device_name"] = str(info.get("device_name") or "") or None
            raw = info.get("max_recommended_working_set_size") or info.get("memory_size")
            facts["mlx_memory_bytes"] = int(raw) if raw else None
    except Exception:
        pass
    return facts


@dataclass(frozen=True)
class HostFacts:
    """Everything the probe reads from the real system.

    Build one directly in tests; :meth:`gather` reads the running host; :meth:`load` reads a
    recorded JSON file (see ``HOSTGPU_PROBE_FACTS``).
    """

    system: str  # platform.system(): "Darwin", "Linux", "Windows"
    machine: str  # platform.machine(): "arm64", "x86_64", "aarch64"
    kernel_release: str = ""  # platform.release(): "23.5.0", "6.10.14-linuxkit"
    mac_version: str = ""  # platform.mac_ver()[0]: "14.5"; "" elsewhere
    os_release: str = ""  # PRETTY_NAME from /etc/os-release on Linux
    python: str = field(default_factory=platform.python_version)
    dockerenv: bool = False  # /.dockerenv exists
    containerenv: bool = False  # /run/.containerenv exists (podman, buildah)
    cgroup: str = ""  # /proc/1/cgroup
    mounts: str = ""  # /proc/mounts
    nvidia_driver: str | None = None  # first line of /proc/driver/nvidia/version
    wsl_libcuda: bool = False  # /usr/lib/wsl/lib/libcuda.so exists (WSL2 GPU passthrough)
    rosetta: bool = False  # an x86_64 Python translated by Rosetta on Apple silicon
    cpu_count: int = 1
    ram_bytes: int = 0
    cpu_model: str | None = None
    assume_container: bool = False  # HOSTGPU_ASSUME_CONTAINER=1
    cuda_visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES
    torch: TorchFacts | None = None  # None: torch is not installed (or broken: torch_error)
    torch_error: str | None = None  # why torch failed to import, when installed but broken
    mlx_version: str | None = None
    mlx_metal: bool | None = None
    mlx_device_name: str | None = None
    mlx_memory_bytes: int | None = None
    mlx_default_device: str | None = None  # "Device(gpu, 0)" or "Device(cpu, 0)"
    recorded_from: str | None = None  # the file these facts were loaded from, if any

    @classmethod
    def gather(cls, root: Path = Path("/")) -> HostFacts:
        """Read the running host (files under ``root``, so tests can point at a fake tree)."""
        system = platform.system()
        cpu_model: str | None = None
        rosetta = False
        if system == "Darwin":
            cpu_model = _sysctl("machdep.cpu.brand_string")
            rosetta = _sysctl("sysctl.proc_translated") == "1"
        elif system == "Linux":
            cpu_model = _cpu_model_linux(_read_text(root / "proc" / "cpuinfo"))
        os_release = ""
        release_text = _read_text(root / "etc" / "os-release") or ""
        match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', release_text, re.MULTILINE)
        if match:
            os_release = match.group(1)
        driver = _read_text(root / "proc" / "driver" / "nvidia" / "version")
        torch, torch_error = _read_torch()
        mlx = _mlx_info()
        return cls(
            system=system,
            machine=platform.machine(),
            kernel_release=platform.release(),
            mac_version=platform.mac_ver()[0] if system == "Darwin" else "",
            os_release=os_release,
            python=platform.python_version(),
            dockerenv=(root / ".dockerenv").exists(),
            containerenv=(root / "run" / ".containerenv").exists(),
            cgroup=_read_text(root / "proc" / "1" / "cgroup") or "",
            mounts=_read_text(root / "proc" / "mounts") or "",
            nvidia_driver=driver.strip().splitlines()[0] if driver and driver.strip() else None,
            wsl_libcuda=(root / "usr" / "lib" / "wsl" / "lib" / "libcuda.so").exists(),
            rosetta=rosetta,
            cpu_count=os.cpu_count() or 1,
            ram_bytes=_ram_bytes(),
            cpu_model=cpu_model or platform.processor() or None,
            assume_container=assume_container(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            torch=torch,
            torch_error=torch_error,
            **mlx,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostFacts:
        data = dict(data)
        torch = data.pop("torch", None)
        if isinstance(torch, dict):
            gpus = tuple(GpuFacts(**g) for g in torch.pop("gpus", ()) or ())
            data["torch"] = TorchFacts(**torch, gpus=gpus)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            from hostgpu.errors import ConfigError

            raise ConfigError(f"unknown host fact(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> HostFacts:
        facts = cls.from_dict(json.loads(path.read_text()))
        return dataclasses.replace(facts, recorded_from=str(path))


def gather_facts() -> HostFacts:
    """The host's facts, or the recorded ones named by ``HOSTGPU_PROBE_FACTS``."""
    recorded = os.environ.get(PROBE_FACTS_ENV)
    if recorded:
        log.warning(
            "%s=%s: reporting the recorded devices in that file, not this machine's",
            PROBE_FACTS_ENV,
            recorded,
        )
        return HostFacts.load(Path(recorded))
    return HostFacts.gather()
