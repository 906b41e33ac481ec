"""Inference engines behind one interface (:mod:`.base`), imported only when used.

``transformers`` (torch: CPU, CUDA, MPS) always works; ``mlx_lm`` runs on Apple silicon (and on
MLX's CPU backend elsewhere); ``llama.cpp`` needs the optional ``llama-cpp-python``.
"""

from __future__ import annotations

import importlib

from hostgpu.inference.engines.base import (
    Completion,
    Engine,
    EngineStats,
    GenerationStream,
    SamplingParams,
    StreamDelta,
    Usage,
)
from hostgpu.inference.errors import EngineUnavailable
from hostgpu.inference.models import ModelSpec

__all__ = [
    "ENGINE_CLASSES",
    "Completion",
    "Engine",
    "EngineStats",
    "GenerationStream",
    "SamplingParams",
    "StreamDelta",
    "Usage",
    "create_engine",
    "engine_class",
]

#: Engine name in a model spec → "module:class", imported on first use.
ENGINE_CLASSES = {
    "transformers": "hostgpu.inference.engines.transformers:TransformersEngine",
    "mlx_lm": "hostgpu.inference.engines.mlx:MlxEngine",
    "llama.cpp": "hostgpu.inference.engines.llamacpp:LlamaCppEngine",
}


def engine_class(name: str) -> type[Engine]:
    try:
        module_name, _, attr = ENGINE_CLASSES[name].partition(":")
    except KeyError:
        raise EngineUnavailable(
            f"unknown engine {name!r}: use one of {', '.join(ENGINE_CLASSES)}"
        ) from None
    cls = getattr(importlib.import_module(module_name), attr)
    assert issubclass(cls, Engine)
    return cls


def create_engine(spec: ModelSpec) -> Engine:
    """An unloaded engine for ``spec`` (call ``load(device)`` on it)."""
    return engine_class(spec.engine)(spec)
