"""Accelerator probe: which devices this process can really use, and why the others are missing.

- :mod:`~hostgpu.devices.facts`: everything read from the real system (and the one test seam,
  ``HOSTGPU_PROBE_FACTS``);
- :mod:`~hostgpu.devices.explain`: where this process runs (container, desktop VM) and a
  reason and fix for each missing accelerator;
- :mod:`~hostgpu.devices.probe`: the report, the usable devices, ``DEVICE``;
- :mod:`~hostgpu.devices.smoke`: a timed matmul per device.

torch and mlx are imported only while gathering facts or timing: the core imports without them.
"""

from __future__ import annotations

from hostgpu.devices.explain import (
    Missing,
    VirtualMachine,
    detect_container,
    detect_macos_vm,
    detect_vm,
)
from hostgpu.devices.facts import GpuFacts, HostFacts, TorchFacts, gather_facts
from hostgpu.devices.probe import (
    REQUIREMENTS,
    Report,
    best_device,
    cached_report,
    host_report,
    probe,
    require,
    usable_devices,
)
from hostgpu.devices.smoke import smoke_test

__all__ = [
    "REQUIREMENTS",
    "GpuFacts",
    "HostFacts",
    "Missing",
    "Report",
    "TorchFacts",
    "VirtualMachine",
    "best_device",
    "cached_report",
    "detect_container",
    "detect_macos_vm",
    "detect_vm",
    "gather_facts",
    "host_report",
    "probe",
    "require",
    "smoke_test",
    "usable_devices",
]
