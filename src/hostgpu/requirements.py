"""What a job needs from the worker that runs it: the device rule's vocabulary."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

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
#: Free text (reasons, messages): anything but NUL, which PostgreSQL text cannot hold. Said in
#: the schema, so a client (or a fuzzer) knows before the database refuses it.
NO_NUL = r"^[^\x00]*$"
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9_.\-/]{1,63}$"


def closed_keys(schema: dict[str, Any]) -> None:
    """``json_schema_extra`` for a dict field with constrained keys: pydantic states the keys as
    ``patternProperties`` and leaves other keys allowed; say they are not, so the schema
    refuses what the model refuses."""
    for part in [schema, *schema.get("anyOf", [])]:
        if "patternProperties" in part:
            part["additionalProperties"] = False


def _not_a_bool(value: Any) -> Any:
    # JSON true/false are not numbers, though pydantic reads them as 1 and 0. (Its strict mode
    # refuses them, but also 300.0 for an integer, which JSON Schema calls an integer.)
    if isinstance(value, bool):
        raise ValueError("expected a number, not true or false")
    return value


#: In ``Annotated[int, Field(ge=…), NOT_BOOL]``: after the constraints, so the schema keeps
#: them as JSON Schema ``minimum``/``maximum``.
NOT_BOOL = BeforeValidator(_not_a_bool)

# Field types shared by the wire models: the schema states every rule the store relies on.
Text = Annotated[str, Field(max_length=2000, pattern=NO_NUL)]
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(max_length=200, pattern=NO_NUL)]
ModuleName = Annotated[str, Field(max_length=300, pattern=MODULE_PATTERN)]
FunctionPath = Annotated[str, Field(max_length=300, pattern=FUNCTION_PATTERN)]


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
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict, max_length=16, json_schema_extra=closed_keys
    )

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
