"""What a job needs from the worker that runs it: the device rule's vocabulary."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator

#: A job's function: "package.module:qualname".
FUNCTION_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
# ASCII classes only: the same pattern is published in the OpenAPI schema, and Python's and
# JSON Schema's ideas of \S (and of `$` before a newline) differ.
GPU_PATTERN = r"^(mps|cuda|gpu|cpu|any|mlx|cuda:[A-Za-z0-9_. ()-]{1,100})$"
FUNCTION_RE = re.compile(FUNCTION_PATTERN)
GPU_RE = re.compile(GPU_PATTERN)
#: A blob's name: the hex SHA-256 of its bytes.
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
#: Printable ASCII without NUL and friends: ids, keys and names end up in SQL and in logs.
SAFE_TEXT = r"^[\x20-\x7e]*$"


def normalise_gpu(value: str) -> str:
    """Check a ``gpu`` value and return its canonical (lower-case) form."""
    if not GPU_RE.fullmatch(value):
        raise ValueError(
            f"gpu must be one of mps, cuda, cuda:<name>, mlx, gpu, cpu, any (got {value!r})"
        )
    kind, _, name = value.partition(":")
    return f"{kind.lower()}:{name.lower()}" if name else kind.lower()


class Requirements(BaseModel):
    """What a job needs from the worker that runs it."""

    gpu: str = Field(
        default="any",
        description="mps | cuda | cuda:<name substring> | mlx | gpu (any accelerator) | cpu | any",
        json_schema_extra={"pattern": GPU_PATTERN},
    )
    min_memory_gb: float | None = Field(default=None, ge=0, le=100_000)
    labels: dict[str, str] = Field(default_factory=dict, max_length=16)

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str) -> str:
        return normalise_gpu(value)

    @property
    def kind(self) -> str:
        return self.gpu.partition(":")[0]

    @property
    def name(self) -> str | None:
        return self.gpu.partition(":")[2] or None

    def describe(self) -> str:
        parts = [self.gpu]
        if self.min_memory_gb:
            parts.append(f"≥{self.min_memory_gb:g} GB")
        parts += [f"{k}={v}" for k, v in sorted(self.labels.items())]
        return " ".join(parts)
