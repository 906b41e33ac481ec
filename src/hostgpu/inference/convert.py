"""GGUF → Hugging Face folder (safetensors), converted once and kept in the model cache.

Two engines need it: mlx_lm cannot read a GGUF file at all, and transformers reads one by
de-quantising every tensor on each load (14–23 s for SmolLM2-135M on two cores, against
0.3 s from the converted folder). The conversion de-quantises to float32 once, through
transformers' own GGUF reader, so the weights are exactly what transformers would have loaded.

The cache entry is keyed by the GGUF's path, size and modification time; it is written to a
temporary folder and renamed into place, under a file lock, so concurrent workers convert once
and never read a half-written folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hostgpu.inference.errors import EngineError, EngineUnavailable
from hostgpu.inference.models import ModelSpec, model_cache_dir

log = logging.getLogger("hostgpu.inference")

_DONE = ".complete"


def _key(gguf: Path) -> str:
    stat = gguf.stat()
    ident = f"{gguf.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def hf_folder(spec: ModelSpec, cache: Path | None = None) -> Path:
    """A Hugging Face folder for ``spec``: its own folder, or the converted GGUF's."""
    gguf = spec.weights_file()
    if gguf is None or gguf.suffix != ".gguf":
        return spec.folder()
    root = (cache or model_cache_dir()) / "hf"
    target = root / f"{gguf.stem}-{_key(gguf)}"
    if (target / _DONE).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE).exists():
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EngineUnavailable(
            f"converting {gguf.name} needs torch, transformers and gguf: "
            f"pip install 'hostgpu[llm]' ({exc})"
        ) from None
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The weights are de-quantised float32 tensors now; what marks the model "quantised
        # with gguf" is only the loader's record, and save_pretrained refuses while it is set.
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _add_legacy_rope_theta(tmp / "config.json")
        shutil.rmtree(target, ignore_errors=True)
        (tmp / _DONE).write_text(gguf.name)
        tmp.rename(target)
    except EngineUnavailable:
        raise
    except Exception as exc:
        raise EngineError(f"could not convert {gguf} to safetensors: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _add_legacy_rope_theta(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; mlx_lm's llama reads only ``rope_theta``.

    Without it mlx_lm silently uses 10,000 instead of SmolLM2's 100,000 and the model's
    output degrades: write both.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
