"""Accelerator probe: which devices this process can really use, and why the others are missing.

Every read of the real system happens in :meth:`HostFacts.gather`; :func:`probe` is a pure
function of those facts, so tests hand it recorded facts (a Docker Desktop VM on a Mac, a Linux
box with two GPUs, a CPU-only torch build…) and a small torch stand-in.

torch and mlx are imported lazily, only inside :meth:`HostFacts.gather` and
:func:`smoke_test`: the core package imports without them.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from hostgpu.capabilities import Device
from hostgpu.errors import ConfigError, DeviceUnavailable

AcceleratorKind = Literal["cuda", "mps", "mlx"]
Requirement = Literal["mps", "cuda", "gpu"]
REQUIREMENTS: tuple[str, ...] = ("mps", "cuda", "gpu")

INSTALL_TORCH = "pip install 'hostgpu[ml]'"
MPS_MIN_MACOS = (12, 3)
MLX_MIN_MACOS = (13, 5)
NATIVE_WORKER = "run `hostgpu worker` natively on the Mac"


class Missing(BaseModel):
    """An accelerator this process cannot use: one line of reason, one line of fix."""

    kind: AcceleratorKind
    reason: str
    fix: str


class Report(BaseModel):
    """What the probe found."""

    os: str
    os_version: str
    kernel: str = ""
    machine: str
    python: str
    container: str | None = None
    vm_on_macos: bool = False
    torch_version: str | None = None
    torch_mps_built: bool | None = None
    torch_mps_available: bool | None = None
    torch_cuda_available: bool | None = None
    mlx_version: str | None = None
    cpu_cores: int
    ram_bytes: int
    devices: list[Device] = Field(default_factory=list)
    missing: list[Missing] = Field(default_factory=list)
    smoke: list[dict[str, Any]] | None = None

    def missing_for(self, kind: str) -> Missing | None:
        return next((m for m in self.missing if m.kind == kind), None)


# --------------------------------------------------------------------------- the seam


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


def _import_torch() -> tuple[Any | None, str | None]:
    """Import torch; (module, None), or (None, why) when it is absent or broken."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
    except ModuleNotFoundError:
        return None, None
    except Exception as exc:  # a broken install (missing CUDA libraries, bad wheel)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return torch, None


def _mlx_info() -> tuple[str | None, bool | None, str | None, int | None]:
    """(version, metal available, GPU name, memory bytes) of an installed MLX."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlx.core as mx
    except Exception:
        return None, None, None, None
    try:
        from importlib.metadata import version

        mlx_version: str | None = version("mlx")
    except Exception:
        mlx_version = str(getattr(mx, "__version__", "unknown"))
    metal: bool | None = None
    name: str | None = None
    memory: int | None = None
    try:
        metal = bool(mx.metal.is_available())
        if metal:
            info_fn = getattr(mx, "device_info", None) or mx.metal.device_info
            info = dict(info_fn())
            name = str(info.get("device_name") or "") or None
            raw = info.get("max_recommended_working_set_size") or info.get("memory_size")
            memory = int(raw) if raw else None
    except Exception:
        pass
    return mlx_version, metal, name, memory


@dataclass
class HostFacts:
    """Everything the probe reads from the real system, in one place.

    Build one directly in tests; :meth:`gather` reads the running host.
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
    torch: Any | None = None  # the torch module, or a stand-in
    torch_error: str | None = None  # why torch failed to import, when installed but broken
    mlx_version: str | None = None
    mlx_metal: bool | None = None
    mlx_device_name: str | None = None
    mlx_memory_bytes: int | None = None

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
        torch, torch_error = _import_torch()
        mlx_version, mlx_metal, mlx_name, mlx_memory = _mlx_info()
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
            assume_container=os.environ.get("HOSTGPU_ASSUME_CONTAINER", "").lower()
            in ("1", "true", "yes"),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            torch=torch,
            torch_error=torch_error,
            mlx_version=mlx_version,
            mlx_metal=mlx_metal,
            mlx_device_name=mlx_name,
            mlx_memory_bytes=mlx_memory,
        )


def gather_facts() -> HostFacts:
    """The seam :func:`probe` uses when no facts are given (tests may patch it)."""
    return HostFacts.gather()


# --------------------------------------------------------------------------- analysis


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def detect_container(facts: HostFacts) -> str | None:
    """The container runtime this process runs in, or None on a bare host or VM."""
    if facts.containerenv:
        return "podman"
    if facts.dockerenv:
        return "docker"
    cgroup = facts.cgroup
    if re.search(r"kubepods", cgroup):
        return "kubernetes"
    if re.search(r"libpod|podman", cgroup):
        return "podman"
    if re.search(r"/docker[/-]|docker-[0-9a-f]+\.scope", cgroup):
        return "docker"
    if re.search(r"containerd", cgroup):
        return "containerd"
    if re.search(r"/lxc[/.]|lxc\.payload", cgroup):
        return "lxc"
    root_line = next(
        (
            line
            for line in facts.mounts.splitlines()
            if len(line.split()) > 2 and line.split()[1] == "/"
        ),
        "",
    )
    if root_line.split()[:1] == ["overlay"] or "upperdir=" in root_line:
        if "/var/lib/docker/" in root_line:
            return "docker"
        if "containerd" in root_line:
            return "containerd"
        if "/containers/storage/" in root_line:
            return "podman"
    if "kubernetes.io/serviceaccount" in facts.mounts:
        return "kubernetes"
    if facts.assume_container:
        return "container"
    return None


def detect_macos_vm(facts: HostFacts) -> str | None:
    """Which Linux VM on macOS runs this process ("Docker Desktop", "OrbStack"), or None."""
    if facts.system != "Linux":
        return None
    release = facts.kernel_release.lower()
    if "orbstack" in release:
        return "OrbStack"
    if "linuxkit" in release:
        return "Docker Desktop"
    # Docker Desktop's file sharing from the Mac shows up as these filesystem types.
    if re.search(r"\s(fakeowner|grpcfuse|osxfs)\s", facts.mounts):
        return "Docker Desktop"
    return None


def _torch_version(torch: Any) -> str:
    return str(getattr(torch, "__version__", "unknown"))


def _torch_missing(kind: AcceleratorKind, facts: HostFacts) -> Missing:
    if facts.torch_error:
        return Missing(
            kind=kind,
            reason=f"torch is installed but fails to import ({facts.torch_error})",
            fix="reinstall it: pip install --force-reinstall 'torch==2.13.0'",
        )
    return Missing(kind=kind, reason="torch is not installed", fix=INSTALL_TORCH)


def _vm_missing(kind: AcceleratorKind, vm: str, facts: HostFacts) -> Missing:
    where = f"inside {vm}'s Linux VM on macOS (kernel {facts.kernel_release or '?'})"
    if kind == "cuda":
        return Missing(
            kind=kind,
            reason=f"{where}: Macs have no CUDA and Metal is unreachable from containers",
            fix=f"{NATIVE_WORKER} (it uses MPS)",
        )
    return Missing(
        kind=kind,
        reason=f"{where}: Metal is unreachable from containers",
        fix=NATIVE_WORKER,
    )


def _apple_silicon_missing(
    kind: AcceleratorKind, facts: HostFacts, container: str | None
) -> Missing | None:
    """Reasons shared by mps and mlx that do not depend on the library; None when they pass."""
    label = "MPS" if kind == "mps" else "MLX"
    if facts.system != "Darwin":
        if container:
            return Missing(
                kind=kind,
                reason=(
                    f"{label} exists only on Apple silicon Macs, and no {container} container "
                    "can reach Metal"
                ),
                fix=f"if the host is a Mac, {NATIVE_WORKER}",
            )
        return Missing(
            kind=kind,
            reason=f"{label} exists only on Apple silicon Macs; this is {facts.system or '?'}",
            fix="use CUDA or the CPU here, or run `hostgpu worker` on an Apple silicon Mac",
        )
    if facts.rosetta:
        return Missing(
            kind=kind,
            reason="this Python is x86_64 running under Rosetta on an Apple silicon Mac",
            fix="install an arm64 Python (python.org or `uv python install`) and recreate the venv",
        )
    if facts.machine != "arm64":
        return Missing(
            kind=kind,
            reason=f"this is an Intel Mac ({facts.machine}): {label} needs Apple silicon (M1+)",
            fix="run `hostgpu worker` on an Apple silicon Mac, or use the CPU here",
        )
    return None


def _explain_mps(facts: HostFacts, container: str | None, vm: str | None) -> Missing:
    if vm:
        return _vm_missing("mps", vm, facts)
    shared = _apple_silicon_missing("mps", facts, container)
    if shared:
        return shared
    mac = _version_tuple(facts.mac_version)
    if mac and mac < MPS_MIN_MACOS:
        return Missing(
            kind="mps",
            reason=f"macOS {facts.mac_version} is too old: MPS needs macOS 12.3 or later",
            fix="update macOS (14 or later recommended)",
        )
    torch = facts.torch
    if torch is None:
        return _torch_missing("mps", facts)
    version = _torch_version(torch)
    mps = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is None:
        return Missing(
            kind="mps",
            reason=f"torch {version} predates MPS support",
            fix=f"upgrade torch: {INSTALL_TORCH}",
        )
    if not mps.is_built():
        return Missing(
            kind="mps",
            reason=f"torch {version} was built without MPS",
            fix=f"install the official macOS arm64 wheel: pip install --force-reinstall "
            f"'torch=={version.split('+')[0]}'",
        )
    return Missing(
        kind="mps",
        reason=f"torch {version} has MPS built in but torch.backends.mps.is_available() is False",
        fix="update macOS (14 or later recommended) and run natively, not in a VM or sandbox",
    )


def _explain_mlx(facts: HostFacts, container: str | None, vm: str | None) -> Missing:
    if vm:
        return _vm_missing("mlx", vm, facts)
    shared = _apple_silicon_missing("mlx", facts, container)
    if shared:
        return shared
    if facts.mlx_version is None:
        return Missing(kind="mlx", reason="mlx is not installed", fix="pip install mlx")
    mac = _version_tuple(facts.mac_version)
    if mac and mac < MLX_MIN_MACOS:
        return Missing(
            kind="mlx",
            reason=f"macOS {facts.mac_version} is too old: MLX needs macOS 13.5 or later",
            fix="update macOS (14 or later recommended)",
        )
    return Missing(
        kind="mlx",
        reason=f"mlx {facts.mlx_version} is installed but Metal is not available to it",
        fix="reinstall it natively on the Mac: pip install --force-reinstall mlx",
    )


def _explain_cuda(facts: HostFacts, container: str | None, vm: str | None) -> Missing:
    if vm:
        return _vm_missing("cuda", vm, facts)
    if facts.system == "Darwin":
        return Missing(
            kind="cuda",
            reason="macOS has no CUDA: Apple GPUs are reached through Metal (MPS)",
            fix="use mps on this Mac; run CUDA work on a Linux or Windows box with an NVIDIA GPU",
        )
    wsl = "microsoft" in facts.kernel_release.lower()
    if facts.system == "Linux":
        has_driver = facts.nvidia_driver is not None or (wsl and facts.wsl_libcuda)
        if not has_driver:
            if container:
                return Missing(
                    kind="cuda",
                    reason=f"no GPU device was passed into this {container} container",
                    fix="run it with --gpus all (nvidia-container-toolkit), or run the worker "
                    "natively",
                )
            if wsl:
                return Missing(
                    kind="cuda",
                    reason="WSL2 sees no NVIDIA GPU (/usr/lib/wsl/lib/libcuda.so is missing)",
                    fix="install the NVIDIA driver on Windows (not inside WSL) and restart WSL",
                )
            return Missing(
                kind="cuda",
                reason="no NVIDIA driver is loaded (/proc/driver/nvidia/version is missing)",
                fix="install the NVIDIA driver so that `nvidia-smi` works, or use a GPU machine",
            )
    torch = facts.torch
    if torch is None:
        return _torch_missing("cuda", facts)
    version = _torch_version(torch)
    built_cuda = getattr(getattr(torch, "version", None), "cuda", None)
    if not built_cuda:
        return Missing(
            kind="cuda",
            reason=f"torch {version} is a CPU-only build (torch.version.cuda is None)",
            fix="install a CUDA build: pip install --force-reinstall torch "
            "--index-url https://download.pytorch.org/whl/cu128",
        )
    if facts.cuda_visible_devices is not None and not facts.cuda_visible_devices.strip():
        return Missing(
            kind="cuda",
            reason="CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU",
            fix="unset CUDA_VISIBLE_DEVICES or list the GPU indices to use",
        )
    driver = f" ({facts.nvidia_driver})" if facts.nvidia_driver else ""
    return Missing(
        kind="cuda",
        reason=f"the NVIDIA driver is present{driver} but torch.cuda.is_available() is False "
        f"(torch built for CUDA {built_cuda})",
        fix=f"update the driver to one that supports CUDA {built_cuda}, or install a torch "
        "build for an older CUDA",
    )


def _safe(call: Any, default: Any = None) -> Any:
    try:
        return call()
    except Exception:
        return default


def _cuda_devices(torch: Any) -> list[Device]:
    devices: list[Device] = []
    count = int(torch.cuda.device_count())
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        major = getattr(props, "major", None)
        minor = getattr(props, "minor", None)
        memory = getattr(props, "total_memory", None)
        devices.append(
            Device(
                kind="cuda",
                index=index,
                name=str(getattr(props, "name", f"CUDA device {index}")),
                memory_bytes=int(memory) if memory is not None else None,
                compute_capability=f"{major}.{minor}" if major is not None else None,
            )
        )
    return devices


def _cpu_name(facts: HostFacts) -> str:
    return facts.cpu_model or facts.machine or "CPU"


def probe(*, facts: HostFacts | None = None) -> Report:
    """Probe the host (or the given recorded facts) and explain every missing accelerator."""
    if facts is None:
        facts = gather_facts()
    container = detect_container(facts)
    vm = detect_macos_vm(facts)
    if vm and container is None:
        container = "docker" if vm == "Docker Desktop" else "container"
    torch = facts.torch
    devices: list[Device] = []
    missing: list[Missing] = []

    mps_mod = getattr(getattr(torch, "backends", None), "mps", None) if torch is not None else None
    mps_built: bool | None = _safe(mps_mod.is_built, False) if mps_mod is not None else None
    mps_available: bool | None = _safe(mps_mod.is_available, False) if mps_mod is not None else None
    cuda_available: bool | None = (
        bool(_safe(torch.cuda.is_available, False)) if torch is not None else None
    )
    if torch is not None and mps_mod is None:
        mps_built = mps_available = False

    # CUDA first: when a machine has both, the discrete GPU is the better default.
    if cuda_available:
        try:
            found = _cuda_devices(torch)
        except Exception as exc:
            found = []
            missing.append(
                Missing(
                    kind="cuda",
                    reason=f"torch.cuda is available but reading its devices failed: {exc}",
                    fix="check `nvidia-smi`; the driver may be wedged (a reboot usually helps)",
                )
            )
        devices.extend(found)
        if not found and not missing:
            missing.append(
                Missing(
                    kind="cuda",
                    reason="torch.cuda.is_available() is True but it reports no devices",
                    fix="check CUDA_VISIBLE_DEVICES and `nvidia-smi`",
                )
            )
    else:
        missing.append(_explain_cuda(facts, container, vm))

    if mps_available and not vm:
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        memory = _safe(recommended) if recommended is not None else None
        chip = facts.cpu_model if facts.cpu_model and "Apple" in facts.cpu_model else "Apple"
        devices.append(
            Device(
                kind="mps",
                index=0,
                name=f"{chip} GPU (Metal)",
                memory_bytes=int(memory) if memory else facts.ram_bytes or None,
            )
        )
    else:
        missing.append(_explain_mps(facts, container, vm))

    if facts.mlx_metal and facts.mlx_version and not vm:
        chip = facts.cpu_model if facts.cpu_model and "Apple" in facts.cpu_model else "Apple"
        devices.append(
            Device(
                kind="mlx",
                index=0,
                name=facts.mlx_device_name or f"{chip} GPU (MLX)",
                memory_bytes=facts.mlx_memory_bytes or facts.ram_bytes or None,
            )
        )
    else:
        missing.append(_explain_mlx(facts, container, vm))

    devices.append(Device(kind="cpu", name=_cpu_name(facts), memory_bytes=facts.ram_bytes or None))

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
        vm_on_macos=vm is not None,
        torch_version=_torch_version(torch) if torch is not None else None,
        torch_mps_built=mps_built,
        torch_mps_available=mps_available,
        torch_cuda_available=cuda_available,
        mlx_version=facts.mlx_version,
        cpu_cores=facts.cpu_count,
        ram_bytes=facts.ram_bytes,
        devices=devices,
        missing=missing,
    )


# --------------------------------------------------------------------------- the host


@lru_cache(maxsize=1)
def host_report() -> Report:
    """The probe of the real host, computed once per process."""
    return probe()


def usable_devices(*, report: Report | None = None, device: str | None = None) -> list[Device]:
    """The devices this process may use, honouring ``DEVICE`` (auto|mps|cuda|cpu).

    ``DEVICE=cpu`` gives only the CPU; ``DEVICE=mps`` or ``cuda`` gives that kind (then the CPU)
    and raises :class:`DeviceUnavailable` with the reason and fix when it is missing — never a
    silent fallback.
    """
    report = report or host_report()
    wanted = (device if device is not None else os.environ.get("DEVICE", "auto")).strip().lower()
    wanted = wanted or "auto"
    cpu = [d for d in report.devices if d.kind == "cpu"]
    if wanted == "auto":
        return list(report.devices)
    if wanted == "cpu":
        return cpu
    if wanted not in ("mps", "cuda", "mlx"):
        raise ConfigError(f"DEVICE={wanted!r} is not one of auto, mps, cuda, cpu")
    chosen = [d for d in report.devices if d.kind == wanted]
    if not chosen:
        why = report.missing_for(wanted)
        detail = f": {why.reason}. Fix: {why.fix}" if why else ""
        raise DeviceUnavailable(
            f"DEVICE={wanted} but {wanted} is not usable here{detail}",
            kind=wanted,
        )
    return chosen + cpu


def best_device(*, report: Report | None = None, device: str | None = None) -> Device:
    """The first usable accelerator, else the CPU (``DEVICE`` is honoured)."""
    return usable_devices(report=report, device=device)[0]


def require(report: Report, what: str) -> bool:
    """Whether the report has a usable ``mps``, ``cuda``, or any accelerator (``gpu``)."""
    if what == "gpu":
        return any(d.is_accelerator for d in report.devices)
    if what in ("mps", "cuda", "mlx"):
        return any(d.kind == what for d in report.devices)
    raise ValueError(f"unknown requirement {what!r}: use one of {', '.join(REQUIREMENTS)}")


# --------------------------------------------------------------------------- smoke test


def _label(device: Device) -> str:
    return device.torch_device if device.kind != "mlx" else "mlx"


def _time_torch(torch: Any, device: Device, size: int, repeat: int) -> float:
    target = device.torch_device

    def sync() -> None:
        if device.kind == "cuda":
            torch.cuda.synchronize(target)
        elif device.kind == "mps":
            torch.mps.synchronize()

    a = torch.randn(size, size, device=target, dtype=torch.float32)
    b = torch.randn(size, size, device=target, dtype=torch.float32)
    for _ in range(3):
        (a @ b).sum()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return (time.perf_counter() - start) / repeat


def _time_mlx(size: int, repeat: int) -> float:
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    for _ in range(3):
        mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(a @ b)
    return (time.perf_counter() - start) / repeat


def smoke_test(devices: list[Device], *, size: int = 512, repeat: int = 20) -> list[dict[str, Any]]:
    """Time a ``size``x``size`` float32 matmul on each device; GFLOP/s and speed vs the CPU."""
    torch, error = _import_torch()
    if torch is None:
        why = f"torch fails to import ({error})" if error else "torch is not installed"
        return [{"device": None, "ok": False, "error": f"{why}: {INSTALL_TORCH}"}]
    flop = 2.0 * size**3
    order = sorted(devices, key=lambda d: d.kind != "cpu")  # the CPU first: the reference
    if not any(d.kind == "cpu" for d in order):
        order.insert(0, Device(kind="cpu", name="CPU"))
    cpu_seconds: float | None = None
    results: dict[int, dict[str, Any]] = {}
    for device in order:
        entry: dict[str, Any] = {
            "device": _label(device),
            "kind": device.kind,
            "name": device.name,
            "size": size,
            "repeat": repeat,
        }
        try:
            if device.kind == "mlx":
                seconds = _time_mlx(size, repeat)
            else:
                seconds = _time_torch(torch, device, size, repeat)
        except Exception as exc:
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        else:
            seconds = max(seconds, 1e-9)
            if device.kind == "cpu" and cpu_seconds is None:
                cpu_seconds = seconds
            entry.update(
                ok=True,
                ms=round(seconds * 1000, 4),
                gflops=round(flop / seconds / 1e9, 2),
                vs_cpu=round(cpu_seconds / seconds, 2) if cpu_seconds else None,
            )
        results[id(device)] = entry
    # Report in the order given (the CPU reference stays included when it was added).
    ordered = [results[id(d)] for d in devices if id(d) in results]
    extra = [e for key, e in results.items() if key not in {id(d) for d in devices}]
    return extra + ordered


__all__ = [
    "REQUIREMENTS",
    "HostFacts",
    "Missing",
    "Report",
    "best_device",
    "detect_container",
    "detect_macos_vm",
    "gather_facts",
    "host_report",
    "probe",
    "require",
    "smoke_test",
    "usable_devices",
]
