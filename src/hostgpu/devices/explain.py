"""Why an accelerator is missing: where this process runs, and one line of reason and fix each.

Pure functions of :class:`~hostgpu.devices.facts.HostFacts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from hostgpu.devices.facts import HostFacts

AcceleratorKind = Literal["cuda", "mps", "mlx"]

INSTALL_TORCH = "pip install 'hostgpu[ml]'"
MPS_MIN_MACOS = (12, 3)
MLX_MIN_MACOS = (13, 5)
NATIVE_WORKER = "run `hostgpu worker` natively on the Mac"


class Missing(BaseModel):
    """An accelerator this process cannot use: one line of reason, one line of fix."""

    kind: AcceleratorKind
    reason: str
    fix: str


@dataclass(frozen=True)
class VirtualMachine:
    """The Linux VM a desktop container engine runs this process in."""

    name: str  # "Docker Desktop", "OrbStack", "Colima/Lima", "Rancher Desktop"
    host: Literal["macos", "windows", "linux"] | None  # None: the facts do not tell

    @property
    def on_macos(self) -> bool:
        return self.host == "macos"

    def describe(self) -> str:
        where = {"macos": "on macOS", "windows": "on Windows", "linux": "on Linux"}
        return f"{self.name}'s Linux VM " + where.get(self.host or "", "(host OS unknown)")


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


# File sharing from the host leaves traces in /proc/mounts: macOS home folders live under
# /Users, and Docker Desktop's macOS file sharing uses these filesystem types.
_MAC_MOUNTS = re.compile(r"\s(fakeowner|grpcfuse|osxfs)\s|/run/host_mark/Users|\s/Users/")
# Docker Desktop on Windows mounts drives under /run/desktop/mnt/host/<drive> or /mnt/host/<drive>.
_WINDOWS_MOUNTS = re.compile(r"/(run/desktop/)?mnt/host/[a-z](\s|/)|\sdrvfs\s|\s9p\s.*[A-Z]:\\")


def _host_from_mounts(mounts: str) -> Literal["macos", "windows"] | None:
    if _MAC_MOUNTS.search(mounts):
        return "macos"
    if _WINDOWS_MOUNTS.search(mounts):
        return "windows"
    return None


def detect_vm(facts: HostFacts) -> VirtualMachine | None:
    """The desktop engine's Linux VM this process runs in, and its host OS when the facts say.

    Docker Desktop runs a ``linuxkit`` kernel on macOS, Windows and Linux alike, so the kernel
    alone does not make it a Mac: only file-sharing mounts do. OrbStack exists only on macOS.
    Colima and Rancher Desktop run stock kernels and are recognised by their mounts.
    """
    if facts.system != "Linux":
        return None
    release = facts.kernel_release.lower()
    host = _host_from_mounts(facts.mounts)
    if "orbstack" in release:
        return VirtualMachine("OrbStack", "macos")
    if "linuxkit" in release or re.search(r"\s(fakeowner|grpcfuse|osxfs)\s", facts.mounts):
        return VirtualMachine("Docker Desktop", host)
    lowered = facts.mounts.lower()
    if "rancher-desktop" in lowered or "rancher-desktop" in release:
        return VirtualMachine("Rancher Desktop", host)
    if "lima-cidata" in lowered or "colima" in lowered or "/lima" in lowered:
        return VirtualMachine("Colima/Lima", host)
    return None


def detect_macos_vm(facts: HostFacts) -> str | None:
    """The name of the Linux VM on a Mac that runs this process, or None."""
    vm = detect_vm(facts)
    return vm.name if vm is not None and vm.on_macos else None


def _torch_missing(kind: AcceleratorKind, facts: HostFacts) -> Missing:
    if facts.torch_error:
        return Missing(
            kind=kind,
            reason=f"torch is installed but fails to import ({facts.torch_error})",
            fix="reinstall it: pip install --force-reinstall 'torch==2.13.0'",
        )
    return Missing(kind=kind, reason="torch is not installed", fix=INSTALL_TORCH)


def _vm_missing(kind: AcceleratorKind, vm: VirtualMachine, facts: HostFacts) -> Missing | None:
    """Missing inside a desktop VM; None when the VM does not explain it (CUDA on Windows)."""
    where = f"inside {vm.describe()} (kernel {facts.kernel_release or '?'})"
    if vm.host == "windows":
        if kind == "cuda":
            return None  # Docker Desktop on Windows can pass an NVIDIA GPU through WSL2
        return Missing(
            kind=kind,
            reason=f"{where}: {kind.upper()} exists only on Apple silicon Macs",
            fix="use CUDA (docker run --gpus all) or the CPU on this Windows host",
        )
    if kind == "cuda":
        if vm.on_macos:
            return Missing(
                kind=kind,
                reason=f"{where}: Macs have no CUDA and Metal is unreachable from containers",
                fix=f"{NATIVE_WORKER} (it uses MPS)",
            )
        return None
    if vm.on_macos:
        return Missing(
            kind=kind, reason=f"{where}: Metal is unreachable from containers", fix=NATIVE_WORKER
        )
    return Missing(
        kind=kind,
        reason=f"{where}: no container can reach Metal",
        fix=f"if the host is a Mac, {NATIVE_WORKER}",
    )


def _apple_silicon_missing(
    kind: AcceleratorKind, facts: HostFacts, container: str | None, vm: VirtualMachine | None
) -> Missing | None:
    """Reasons shared by mps and mlx that do not depend on the library (a desktop VM, the OS,
    the chip); None when they pass."""
    if vm:
        found = _vm_missing(kind, vm, facts)
        if found:
            return found
    label = kind.upper()
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


def _macos_too_old(
    kind: AcceleratorKind, facts: HostFacts, minimum: tuple[int, ...]
) -> Missing | None:
    """The macOS release is older than ``minimum`` needs; None when it is not, or unknown."""
    mac = _version_tuple(facts.mac_version)
    if mac and mac < minimum:
        needed = ".".join(str(part) for part in minimum)
        return Missing(
            kind=kind,
            reason=f"macOS {facts.mac_version} is too old: {kind.upper()} needs macOS {needed} "
            "or later",
            fix="update macOS (14 or later recommended)",
        )
    return None


def explain_mps(facts: HostFacts, container: str | None, vm: VirtualMachine | None) -> Missing:
    shared = _apple_silicon_missing("mps", facts, container, vm)
    if shared:
        return shared
    too_old = _macos_too_old("mps", facts, MPS_MIN_MACOS)
    if too_old:
        return too_old
    torch = facts.torch
    if torch is None:
        return _torch_missing("mps", facts)
    if not torch.has_mps_backend:
        return Missing(
            kind="mps",
            reason=f"torch {torch.version} predates MPS support",
            fix=f"upgrade torch: {INSTALL_TORCH}",
        )
    if not torch.mps_built:
        return Missing(
            kind="mps",
            reason=f"torch {torch.version} was built without MPS",
            fix=f"install the official macOS arm64 wheel: pip install --force-reinstall "
            f"'torch=={torch.version.split('+')[0]}'",
        )
    return Missing(
        kind="mps",
        reason=f"torch {torch.version} has MPS built in but torch.backends.mps.is_available() "
        "is False",
        fix="update macOS (14 or later recommended) and run natively, not in a VM or sandbox",
    )


def mlx_has_gpu(facts: HostFacts) -> bool:
    """MLX with a GPU backend (Metal, or CUDA on Linux), not only its CPU backend."""
    if not facts.mlx_version:
        return False
    return bool(facts.mlx_metal) or (facts.mlx_default_device or "").startswith("Device(gpu")


def explain_mlx(facts: HostFacts, container: str | None, vm: VirtualMachine | None) -> Missing:
    if facts.mlx_version and facts.system != "Darwin" and not vm:
        # mlx[cpu] (or a CUDA build without a usable GPU) installs on Linux: jobs asking for
        # gpu="mlx" want an accelerator, so MLX's CPU backend never counts as one.
        return Missing(
            kind="mlx",
            reason=f"mlx {facts.mlx_version} here has only its CPU backend",
            fix="run gpu='mlx' jobs on an Apple silicon Mac (`pip install mlx` there), or use "
            "gpu='cpu' for MLX on the CPU",
        )
    shared = _apple_silicon_missing("mlx", facts, container, vm)
    if shared:
        return shared
    if facts.mlx_version is None:
        return Missing(kind="mlx", reason="mlx is not installed", fix="pip install mlx")
    too_old = _macos_too_old("mlx", facts, MLX_MIN_MACOS)
    if too_old:
        return too_old
    return Missing(
        kind="mlx",
        reason=f"mlx {facts.mlx_version} is installed but Metal is not available to it "
        "(only its CPU backend)",
        fix="reinstall it natively on the Mac: pip install --force-reinstall mlx",
    )


def explain_cuda(facts: HostFacts, container: str | None, vm: VirtualMachine | None) -> Missing:
    if vm:
        found = _vm_missing("cuda", vm, facts)
        if found:
            return found
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
    if not torch.cuda_version:
        return Missing(
            kind="cuda",
            reason=f"torch {torch.version} is a CPU-only build (torch.version.cuda is None)",
            fix="install a CUDA build: pip install --force-reinstall torch "
            "--index-url https://download.pytorch.org/whl/cu128",
        )
    if facts.cuda_visible_devices is not None and not facts.cuda_visible_devices.strip():
        return Missing(
            kind="cuda",
            reason="CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU",
            fix="unset CUDA_VISIBLE_DEVICES or list the GPU indices to use",
        )
    if torch.cuda_available and torch.cuda_error:
        return Missing(
            kind="cuda",
            reason=f"torch.cuda is available but reading its devices failed: {torch.cuda_error}",
            fix="check `nvidia-smi`; the driver may be wedged (a reboot usually helps)",
        )
    if torch.cuda_available:
        return Missing(
            kind="cuda",
            reason="torch.cuda.is_available() is True but it reports no devices",
            fix="check CUDA_VISIBLE_DEVICES and `nvidia-smi`",
        )
    driver = f" ({facts.nvidia_driver})" if facts.nvidia_driver else ""
    return Missing(
        kind="cuda",
        reason=f"the NVIDIA driver is present{driver} but torch.cuda.is_available() is False "
        f"(torch built for CUDA {torch.cuda_version})",
        fix=f"update the driver to one that supports CUDA {torch.cuda_version}, or install a "
        "torch build for an older CUDA",
    )
