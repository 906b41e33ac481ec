"""The one mapping between hostgpu's device vocabulary and Ray's resources and labels.

What a node started with ``hostgpu ray start`` advertises (from the accelerator probe):

==========================  ==========================================================
probe found                 Ray node gets
==========================  ==========================================================
N CUDA devices              ``--num-gpus N``; ``accelerator_type:<Ray's type>`` = 1
                            (Ray's own name, e.g. ``H100``); ``cuda:<words>`` = 1 for
                            every run of whole words of each device name, lower case
                            (``cuda:h100``, ``cuda:nvidia h100 80gb hbm3``, …);
                            ``cuda_memory_gb`` = the devices' memory, summed
MPS (torch on Metal)        ``mps`` = 1, ``mps_memory_gb``, ``gpu`` = 1
MLX with a GPU backend      ``mlx`` = 1, ``mlx_memory_gb``, ``gpu`` = 1
no accelerator (a Mac's     nothing: ``--num-gpus 0`` (so Ray does not guess either), and
Docker VM, a CPU box)       the probe's reason is printed
hostgpu labels              Ray node labels (``--labels k=v,…``)
==========================  ==========================================================

What a function's options ask of Ray (the routing rule of :mod:`hostgpu.routing`):

- ``gpu="cuda"``: ``num_gpus=1`` (Ray assigns the GPU and sets ``CUDA_VISIBLE_DEVICES``, so
  the task's device is ``cuda:0``); ``cuda:<name>`` adds ``cuda:<name>`` = 0.001: a name
  matches whole words of a device name on Ray (``cuda:h100`` yes, ``cuda:h10`` no).
- ``gpu="mps"`` / ``"mlx"``: ``mps`` / ``mlx`` = 0.001. Like Ray's ``accelerator_type``
  markers: the device is shared, as the children of one hostgpu worker share it; a task
  still takes a CPU, so a node runs as many at once as it has CPUs.
- ``gpu="gpu"`` (any accelerator): CUDA when some node has a GPU, else ``gpu`` = 0.001
  (a Mac's mps or mlx); decided when the call is submitted.
- ``gpu="cpu"`` / ``"any"``: no accelerator resource; ``any`` uses the node's mps when it has
  one (shared, as above), never a GPU that Ray did not assign.
- ``memory=M`` (GB): ``<kind>_memory_gb`` = M, reserved while the call runs (on Ray memory
  is a consumable: calls whose reservations exceed a device's memory wait); for ``cpu`` and
  ``any``, Ray's own ``memory`` (bytes).
- ``labels``: a Ray ``label_selector`` (equality).

Pure functions (no Ray import): the CLI, the backend and the tests share them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hostgpu.capabilities import Device
from hostgpu.devices.probe import Report
from hostgpu.errors import ConfigError
from hostgpu.requirements import Requirements

GIB = 1024**3
#: The share of a marker resource (``mps``, ``cuda:<name>``, ``gpu``, …) one call takes,
#: as Ray's own ``accelerator_type`` constraint does.
MARKER = 0.001
#: Environment variable ``hostgpu ray start`` gives the node (and so every Ray worker
#: process on it): the probe's devices and reasons as JSON.
NODE_ENV = "HOSTGPU_RAY_NODE"
#: Memory resources per accelerator kind.
MEMORY_RESOURCE = {"cuda": "cuda_memory_gb", "mps": "mps_memory_gb", "mlx": "mlx_memory_gb"}
ANY_MAC_GPU = "gpu"

# Ray's rule for its own accelerator_type (ray/_private/accelerators/nvidia_gpu.py).
_RAY_TYPE = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")
# A word of a device name: what `cuda:<name>` may match on Ray.
_WORD = re.compile(r"[^\s\-_/(),]+")
#: Ray label keys and values (Kubernetes-style; Ray refuses others at `ray start`).
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def ray_accelerator_type(name: str) -> str | None:
    """The ``accelerator_type`` Ray itself derives from a CUDA device name."""
    match = _RAY_TYPE.match(name)
    result = match.group(1).replace(" ", "-") if match else None
    if result and len(result) > 1:
        return result
    words = name.split()
    if len(words) > 1 and words[0].upper() == "NVIDIA":
        words = words[1:]
    return "-".join(words) or None


def name_fragments(name: str) -> list[str]:
    """Every run of whole words of a device name, lower case, as written:
    ``"Tesla V100-SXM2-16GB"`` → ``tesla``, ``tesla v100``, …, ``v100``, ``v100-sxm2``, …"""
    text = name.lower().strip()
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    found: list[str] = []
    for i, (start, _) in enumerate(spans):
        for _, end in spans[i:]:
            fragment = text[start:end]
            if fragment not in found:
                found.append(fragment)
    return found


def parse_labels(text: str | Iterable[str]) -> dict[str, str]:
    """``"zone=a,team=ml"`` (or ``["zone=a", "team=ml"]``) → a dict; checked for Ray."""
    items = text.split(",") if isinstance(text, str) else list(text)
    labels: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"label {item!r} must look like key=value")
        for part in (key.rpartition("/")[2], value):
            if part and not _LABEL.match(part):
                raise ConfigError(
                    f"label {key}={value}: Ray label keys and values are up to 63 letters, "
                    "digits, '-', '_' or '.', starting and ending with a letter or digit"
                )
        labels[key] = value
    return labels


def _gb(memory_bytes: int | None) -> float:
    return math.floor((memory_bytes or 0) / GIB * 10) / 10


@dataclass(frozen=True)
class NodeAdvert:
    """What one node tells Ray about itself, and why it offers no more."""

    num_gpus: int
    resources: dict[str, float]
    labels: dict[str, str]
    devices: list[Device]
    unavailable: dict[str, str] = field(default_factory=dict)  # kind → the probe's reason
    fixes: dict[str, str] = field(default_factory=dict)  # kind → the probe's fix
    in_mac_vm: str | None = None  # "Docker Desktop's Linux VM on macOS" when so

    def ray_args(self) -> list[str]:
        """``ray start`` options for this advert."""
        args = ["--num-gpus", str(self.num_gpus)]
        if self.resources:
            args += ["--resources", json.dumps(self.resources, sort_keys=True)]
        if self.labels:
            args += ["--labels", ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))]
        return args

    def node_json(self) -> str:
        """The node's description every Ray worker on it reads (``HOSTGPU_RAY_NODE``)."""
        return json.dumps(
            {
                "devices": [d.model_dump(mode="json") for d in self.devices],
                "unavailable": self.unavailable,
                "labels": self.labels,
            },
            separators=(",", ":"),
        )


def advertise(report: Report, labels: Mapping[str, str] | None = None) -> NodeAdvert:
    """The Ray resources and labels for the devices the probe found (see the module doc)."""
    resources: dict[str, float] = {}
    cuda = [d for d in report.devices if d.kind == "cuda"]
    for device in cuda:
        ray_type = ray_accelerator_type(device.name)
        if ray_type:
            resources[f"accelerator_type:{ray_type}"] = 1
        for fragment in name_fragments(device.name):
            resources[f"cuda:{fragment}"] = 1
    if cuda:
        resources[MEMORY_RESOURCE["cuda"]] = _gb(sum(d.memory_bytes or 0 for d in cuda))
    for kind in ("mps", "mlx"):
        found = next((d for d in report.devices if d.kind == kind), None)
        if found is not None:
            resources[kind] = 1
            resources[MEMORY_RESOURCE[kind]] = _gb(found.memory_bytes)
            resources[ANY_MAC_GPU] = 1
    vm = None
    if report.vm_on_macos:
        vm = f"{report.vm or 'a container engine'}'s Linux VM on macOS"
    return NodeAdvert(
        num_gpus=len(cuda),
        resources={k: v for k, v in resources.items() if v},
        labels=dict(labels or {}),
        devices=list(report.devices),
        unavailable={m.kind: m.reason for m in report.missing},
        fixes={m.kind: m.fix for m in report.missing},
        in_mac_vm=vm,
    )


# -- what a call asks for ---------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """The Ray options one call is submitted with, and the device kind it was resolved to."""

    kind: str  # cuda | mps | mlx | gpu (a Mac's GPU) | cpu | any
    num_cpus: float = 1
    num_gpus: float = 0
    resources: tuple[tuple[str, float], ...] = ()
    memory_bytes: int | None = None
    labels: tuple[tuple[str, str], ...] = ()
    describe: str = ""  # the requirement in hostgpu's words, for reasons

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        if self.labels:
            options["label_selector"] = dict(self.labels)
        return options

    def needs(self) -> dict[str, float]:
        """Every Ray resource a node must have, in Ray's names."""
        needs = dict(self.resources)
        if self.num_cpus:
            needs["CPU"] = self.num_cpus
        if self.num_gpus:
            needs["GPU"] = self.num_gpus
        if self.memory_bytes:
            needs["memory"] = float(self.memory_bytes)
        return needs


@dataclass(frozen=True)
class NodeView:
    """One live Ray node as the backend sees it (totals, not what is free)."""

    node_id: str
    address: str
    resources: Mapping[str, float]
    labels: Mapping[str, str]

    def has(self, name: str) -> bool:
        return self.resources.get(name, 0) > 0


def request_for(
    req: Requirements, nodes: Sequence[NodeView] = (), *, num_cpus: float = 1
) -> Request:
    """The Ray request for a requirement (``nodes``: the live cluster, for ``gpu``)."""
    kind = req.kind
    if kind == "gpu":
        # Ray cannot say "a GPU or a Mac's GPU": CUDA when the cluster has it (Ray then
        # assigns the device), else the Mac marker every mps/mlx node carries.
        kind = "cuda" if any(n.has("GPU") for n in nodes) else ANY_MAC_GPU
    resources: dict[str, float] = {}
    num_gpus = 0.0
    memory_bytes = None
    if kind == "cuda":
        num_gpus = 1
        if req.name:
            resources[f"cuda:{req.name.strip()}"] = MARKER
    elif kind in ("mps", "mlx", ANY_MAC_GPU):
        resources[kind] = MARKER
    if req.min_memory_gb:
        if kind in MEMORY_RESOURCE:
            resources[MEMORY_RESOURCE[kind]] = req.min_memory_gb
        elif kind == ANY_MAC_GPU:
            # The memory of whichever Mac GPU: mps and mlx report the same chip.
            resources[MEMORY_RESOURCE["mps"]] = req.min_memory_gb
            resources.pop(ANY_MAC_GPU)
            kind = "mps"
        else:
            memory_bytes = int(req.min_memory_gb * GIB)
    return Request(
        kind=kind,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=tuple(sorted(resources.items())),
        memory_bytes=memory_bytes,
        labels=tuple(sorted(req.labels.items())),
        describe=req.describe(),
    )


def fits(request: Request, node: NodeView) -> bool:
    """Whether ``node`` could ever run ``request`` (its totals suffice; Ray's feasibility)."""
    for name, amount in request.needs().items():
        if node.resources.get(name, 0) + 1e-9 < amount:
            return False
    return all(node.labels.get(k) == v for k, v in request.labels)


def waiting_reason(
    request: Request,
    nodes: Sequence[NodeView],
    node_reasons: Mapping[str, Mapping[str, str]] | None = None,
    *,
    fallback: str | None = None,
) -> str | None:
    """Why a call cannot run on this cluster, in words, or None when some node fits.

    ``node_reasons``: node id → {accelerator kind → the probe's reason} for nodes started
    with ``hostgpu ray start`` (a Mac in a Docker VM says why it has no mps).
    """
    if any(fits(request, node) for node in nodes):
        return None
    what = request.describe or request.kind
    if not nodes:
        reason = "waiting: no Ray node is alive"
    else:
        reason = f"waiting: no Ray node with {what}"
        hints = _hints(request, nodes)
        kind = request.kind if request.kind in MEMORY_RESOURCE else None
        why = sorted({r[kind] for r in (node_reasons or {}).values() if kind and kind in r})
        details = hints + why[:3]
        if details:
            reason += f" ({'; '.join(details)})"
    if fallback == "cpu":
        reason += " (may fall back to cpu after the grace period)"
    return reason


def _hints(request: Request, nodes: Sequence[NodeView]) -> list[str]:
    """What is closest: the same device with too little memory, or a name Ray never saw."""
    hints: list[str] = []
    for name, amount in request.resources:
        have = [n.resources.get(name, 0) for n in nodes if n.has(name)]
        if name.endswith("_memory_gb") and have and max(have) < amount:
            hints.append(f"the largest has {max(have):g} GB")
        elif name.startswith("cuda:") and not have:
            known = sorted(
                {k for n in nodes for k in n.resources if k.startswith("cuda:")}, key=len
            )
            if known:
                hints.append(
                    "Ray nodes match whole words of a GPU name; known: " + ", ".join(known[:4])
                )
    if request.labels and not any(
        all(n.labels.get(k) == v for k, v in request.labels) for n in nodes
    ):
        hints.append("no node has the labels " + ",".join(f"{k}={v}" for k, v in request.labels))
    return hints


def node_devices(node: Mapping[str, Any] | None, default_cpu: str = "CPU") -> list[Device]:
    """The devices in a ``HOSTGPU_RAY_NODE`` description (just the CPU when absent)."""
    if node and node.get("devices"):
        return [Device.model_validate(d) for d in node["devices"]]
    return [Device(kind="cpu", name=default_cpu)]


def devices_from_resources(resources: Mapping[str, float]) -> list[str]:
    """A short summary of a node's accelerators from its Ray resources alone."""
    found: list[str] = []
    gpus = int(resources.get("GPU", 0))
    if gpus:
        names = [k[5:] for k in resources if k.startswith("cuda:")]
        name = max(names, key=len) if names else "GPU"
        memory = resources.get(MEMORY_RESOURCE["cuda"])
        found.append(f"{gpus}× cuda ({name}" + (f", {memory:g} GB" if memory else "") + ")")
    for kind in ("mps", "mlx"):
        if resources.get(kind):
            memory = resources.get(MEMORY_RESOURCE[kind])
            found.append(kind + (f" ({memory:g} GB)" if memory else ""))
    return found
