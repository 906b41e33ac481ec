"""Which device of which worker may run a job: the one rule, used everywhere.

The store turns the same rule into SQL (see ``store/sql.py``) so that leasing
never hands out a job the worker cannot run; this module is the Python form, used
to pick the device for a lease and to explain why a queued job is waiting.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

from hostgpu.capabilities import Capabilities, Device
from hostgpu.requirements import Requirements

GIB = 1024**3
MAX_WORKER_LABELS = 8

#: For each device kind, the requirement kinds it satisfies. Every worker has a CPU,
#: so "cpu" and "any" jobs run anywhere; "gpu" means any accelerator.
SATISFIES: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "gpu", "any"),
    "mps": ("mps", "gpu", "any"),
    "mlx": ("mlx", "gpu", "any"),
    "cpu": ("cpu", "any"),
}


def device_satisfies(device: Device, req: Requirements) -> bool:
    if req.kind not in SATISFIES[device.kind]:
        return False
    if req.name and req.name not in device.name.lower():
        return False
    return not req.min_memory_gb or (
        device.memory_bytes is not None and device.memory_bytes >= req.min_memory_gb * GIB
    )


def labels_match(job_labels: dict[str, str], worker_labels: dict[str, str]) -> bool:
    return all(worker_labels.get(k) == v for k, v in job_labels.items())


def canonical_labels(labels: dict[str, str]) -> str | None:
    """The stored form of a job's labels: sorted JSON, or None when there are none."""
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":")) if labels else None


def label_subsets(labels: dict[str, str]) -> list[str]:
    """Every canonical label set a worker with ``labels`` satisfies (for an SQL ``IN``)."""
    items = sorted(labels.items())[:MAX_WORKER_LABELS]
    subsets = []
    for size in range(1, len(items) + 1):
        for combo in itertools.combinations(items, size):
            subsets.append(json.dumps(dict(combo), separators=(",", ":")))
    return subsets


def pick_device(
    req: Requirements, caps: Capabilities, *, fallback_open: bool = False
) -> tuple[Device, bool] | None:
    """The device to run on and whether that is the explicit CPU fallback.

    Accelerators are preferred in the order the probe listed them; a job that asks
    for "any" runs on an accelerator when there is one.
    """
    if not labels_match(req.labels, caps.labels):
        return None
    for device in caps.devices:
        if device_satisfies(device, req):
            return device, False
    if fallback_open:
        cpu = next((d for d in caps.devices if d.kind == "cpu"), None)
        if cpu is not None:
            return cpu, True
    return None


def waiting_reason(
    req: Requirements,
    function: str,
    workers: Sequence[Capabilities],
    *,
    fallback: str | None = None,
    resolved: bool = True,
) -> str | None:
    """Why a queued job is not running, in words, or None when some live worker fits."""
    module = function.partition(":")[0]
    start = f"start one with `hostgpu worker --import {module}`"
    if not workers:
        reason = f"waiting: no worker is connected ({start})"
    elif not resolved and not any(function in w.functions for w in workers):
        reason = (
            f"waiting: no worker imports {module} yet, so nothing has published {function} "
            f"and its declared options ({start})"
        )
    else:
        fitting = [w for w in workers if pick_device(req, w) is not None]
        if fitting and any(function in w.functions for w in fitting):
            return None
        if fitting:
            reason = f"waiting: no worker with {req.describe()} imports {module} ({start})"
        else:
            reason = f"waiting: no worker with {req.describe()}"
            why = sorted({w.unavailable[req.kind] for w in workers if req.kind in w.unavailable})
            if why:
                reason += f" ({'; '.join(why[:3])})"
    if fallback == "cpu":
        reason += " (may fall back to cpu after the grace period)"
    return reason
