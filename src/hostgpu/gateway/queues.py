"""Queue figures for people: per requirement, how many jobs wait, for how long, why, and the fix.

The reason is the one ``hostgpu jobs`` shows for each queued job
(:func:`hostgpu.routing.waiting_reason`); the fix is added where that reason does not
already say what to do.
"""

from __future__ import annotations

from collections.abc import Sequence

from hostgpu.api import QueuedFunction, QueueStat, QueueStats
from hostgpu.capabilities import Capabilities
from hostgpu.requirements import Requirements
from hostgpu.routing import pick_device, waiting_reason
from hostgpu.stats import QueueGroup

#: Where each accelerator kind is found, for a job no live worker can take.
WHERE = {
    "mps": "natively on a Mac with Apple silicon (not in Docker: containers cannot reach "
    "Metal); `hostgpu doctor --require mps` checks a machine",
    "mlx": "natively on a Mac with Apple silicon and MLX installed",
    "cuda": "on a machine with an NVIDIA GPU and a CUDA build of torch; `hostgpu doctor "
    "--require cuda` checks a machine",
    "gpu": "on a machine with an accelerator (Metal or CUDA); `hostgpu doctor --require gpu` "
    "checks a machine",
}


def fix_for(group: QueueGroup, reason: str | None, workers: Sequence[Capabilities]) -> str | None:
    """What to do about a waiting group, when its reason does not say it already."""
    req = group.requirements
    module = group.function.partition(":")[0]
    if reason is None:
        if group.delayed == group.queued:
            return "these jobs are waiting out a retry backoff; nothing to do"
        return (
            "a live worker fits but is busy: add workers or start them with a higher --concurrency"
        )
    if "start one with" in reason:
        return None
    fitting_kind = [w for w in workers if _fits_kind(req, w)]
    if req.labels and fitting_kind and not any(pick_device(req, w) for w in fitting_kind):
        labels = " ".join(f"--label {k}={v}" for k, v in sorted(req.labels.items()))
        return f"start a worker with {labels} (`hostgpu worker --import {module} {labels}`)"
    if req.min_memory_gb and fitting_kind:
        return (
            f"no live {req.gpu} device has {req.min_memory_gb:g} GB: start a worker on a larger "
            "one, or submit with a smaller min_memory_gb"
        )
    where = WHERE.get(req.kind)
    if where is None:  # cpu / any: every worker has a CPU
        return f"start a worker: `hostgpu worker --import {module}`"
    return f"start `hostgpu worker --import {module}` {where}"


def _fits_kind(req: Requirements, worker: Capabilities) -> bool:
    """Whether the worker has a device of the right kind and name, ignoring memory and labels."""
    loose = Requirements(gpu=req.gpu)
    return pick_device(loose, worker.model_copy(update={"labels": {}})) is not None


def queue_stats(
    groups: Sequence[QueueGroup], workers: Sequence[Capabilities], now: float
) -> QueueStats:
    by_requirement: dict[str, list[QueueGroup]] = {}
    for group in groups:
        by_requirement.setdefault(group.requirements.describe(), []).append(group)
    queues = []
    for requirement, members in by_requirement.items():
        functions = []
        for group in sorted(members, key=lambda g: (-g.queued, g.function)):
            reason = waiting_reason(
                group.requirements,
                group.function,
                workers,
                fallback=group.fallback,
                resolved=group.resolved,
            )
            functions.append(
                QueuedFunction(
                    function=group.function,
                    queued=group.queued,
                    delayed=group.delayed,
                    waiting=reason,
                    fix=fix_for(group, reason, workers),
                )
            )
        runnable = [g.oldest_runnable_at for g in members if g.oldest_runnable_at is not None]
        queues.append(
            QueueStat(
                requirement=requirement,
                gpu=members[0].requirements.gpu,
                queued=sum(g.queued for g in members),
                delayed=sum(g.delayed for g in members),
                oldest_wait_s=max(0.0, now - min(runnable)) if runnable else None,
                functions=functions,
            )
        )
    queues.sort(key=lambda q: (-(q.oldest_wait_s or -1), q.requirement))
    return QueueStats(queues=queues, queued=sum(q.queued for q in queues), at=now)
