"""What a job can ask about the place it runs in (set by the worker's child process)."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

_device: ContextVar[str | None] = ContextVar("hostgpu_device", default=None)
_job_id: ContextVar[str | None] = ContextVar("hostgpu_job_id", default=None)


def device() -> str:
    """The torch device string of the accelerator leased for the running job.

    Outside a job (a plain local call) it is the best device this process can use, as the
    accelerator probe sees it and the ``DEVICE`` setting allows: a setting that names a
    device this host cannot use raises DeviceUnavailable with the reason and the fix.
    """
    current = _device.get() or os.environ.get("HOSTGPU_JOB_DEVICE")
    if current:
        return current
    from hostgpu.devices import best_device

    return best_device().torch_device


def inputs_dir() -> Path | None:
    """The folder where this worker keeps fetched job inputs (None outside a worker)."""
    root = os.environ.get("HOSTGPU_INPUTS_DIR")
    return Path(root) if root else None


def input_path(digest: str) -> Path:
    """The local file of one of the running job's inputs (a blob its worker fetched and
    checked before the job started)."""
    root = inputs_dir()
    path = root / digest[:2] / digest if root else None
    if path is None or not path.is_file():
        from hostgpu.errors import PipelineError

        raise PipelineError(
            f"input {digest} is not on this worker: list it in the job's inputs "
            "(JobSpec.inputs), so the worker fetches it before the job runs"
        )
    return path


def job_id() -> str | None:
    """The id of the running job, or None outside a job."""
    return _job_id.get() or os.environ.get("HOSTGPU_JOB_ID")


def set_job(job: str | None, device_str: str | None) -> None:
    """Called by the worker's child before it runs a job."""
    _job_id.set(job)
    _device.set(device_str)
    if device_str:
        os.environ["HOSTGPU_JOB_DEVICE"] = device_str
    else:
        os.environ.pop("HOSTGPU_JOB_DEVICE", None)
    if job:
        os.environ["HOSTGPU_JOB_ID"] = job
    else:
        os.environ.pop("HOSTGPU_JOB_ID", None)
