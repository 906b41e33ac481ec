"""Time a matmul on a device: `hostgpu doctor --smoke` and the built-in `matmul` job."""

from __future__ import annotations

import time
from typing import Any

from hostgpu.capabilities import Device
from hostgpu.devices.explain import INSTALL_TORCH
from hostgpu.devices.facts import import_torch


def _label(device: Device) -> str:
    return device.torch_device if device.kind != "mlx" else "mlx"


def time_torch_matmul(torch: Any, target: str, size: int, repeat: int, warmup: int = 3) -> float:
    """Seconds per ``size``×``size`` float32 matmul on ``target`` (a torch device string)."""
    kind = target.partition(":")[0]

    def sync() -> None:
        if kind == "cuda":
            torch.cuda.synchronize(target)
        elif kind == "mps":
            torch.mps.synchronize()

    a = torch.randn(size, size, device=target, dtype=torch.float32)
    b = torch.randn(size, size, device=target, dtype=torch.float32)
    for _ in range(warmup):  # kernel selection and lazy initialisation are not the speed
        (a @ b).sum()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return max((time.perf_counter() - start) / repeat, 1e-9)


def time_mlx_matmul(size: int, repeat: int, warmup: int = 3) -> float:
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    for _ in range(warmup):
        mx.eval(a @ b)
    start = time.perf_counter()
    for _ in range(repeat):
        mx.eval(a @ b)
    return max((time.perf_counter() - start) / repeat, 1e-9)


def smoke_test(devices: list[Device], *, size: int = 512, repeat: int = 20) -> list[dict[str, Any]]:
    """Time a ``size``×``size`` float32 matmul on each device; GFLOP/s and speed vs the CPU."""
    torch, error = import_torch()
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
                seconds = time_mlx_matmul(size, repeat)
            else:
                seconds = time_torch_matmul(torch, device.torch_device, size, repeat)
        except Exception as exc:
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        else:
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
