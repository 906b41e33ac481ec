"""Settings from the environment (and flags, which the CLI passes as overrides).

The names people already use in hand-made hybrid setups are honoured without a
prefix (``DEVICE``, ``MODEL_NAME``, ``CHROMA_HOST``…); hostgpu's own settings use
the ``HOSTGPU_`` prefix.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from hostgpu.errors import ConfigError
from hostgpu.jobs import DEFAULT_MAX_RESULT_BYTES
from hostgpu.worker.inputs import DEFAULT_INPUTS_CACHE_BYTES
from hostgpu.worker.output import DEFAULT_JOB_OUTPUT_BYTES

DEFAULT_PORT = 8765


def _alias(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    # A field reads HOSTGPU_<FIELD NAME>, unless it names its variables itself (an alias:
    # then the prefix does not apply). An empty variable counts as unset: `HOSTGPU_X=` would
    # otherwise be the path "." or fail a choice (DEVICE=).
    model_config = SettingsConfigDict(
        env_prefix="HOSTGPU_", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    home: Path = Path("~/.hostgpu")
    gateway: str | None = None
    token: str | None = None
    token_file: Path | None = None
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    # Job store / gateway limits.
    lease_seconds: float = 30.0
    worker_ttl_seconds: float = 30.0
    fallback_grace_seconds: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    max_blob_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    # Inference API (per token, per gateway).
    infer_rate_per_minute: int = Field(default=600, gt=0)
    infer_concurrency: int = Field(default=16, gt=0)
    infer_max_tokens: int = Field(default=8192, gt=0)
    infer_keepalive_seconds: float = Field(default=10.0, gt=0)
    max_lost_leases: int = Field(default=10, ge=0)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=300.0, ge=0)
    log_level: str = "INFO"
    # Bytes of each job's stdout and stderr a worker copies to its own log (the rest: a count).
    job_output_bytes: int = Field(default=DEFAULT_JOB_OUTPUT_BYTES, ge=0)
    # Bytes of fetched job inputs a worker keeps for later jobs (least recently used go first).
    inputs_cache_bytes: int = Field(default=DEFAULT_INPUTS_CACHE_BYTES, ge=0)
    # Models beyond the built-ins and HOME/models.toml: a TOML/JSON file, or inline JSON.
    models: str = ""
    # Where converted weights go (default: HOME/models).
    model_cache: Path | None = None

    # Names shared with hand-made setups.
    device: Literal["auto", "mps", "cuda", "mlx", "cpu"] = Field(
        default="auto", validation_alias=_alias("DEVICE", "HOSTGPU_DEVICE")
    )
    model_name: str | None = Field(default=None, validation_alias=_alias("MODEL_NAME"))
    text_model: str | None = None
    model_precision: Literal["fp16", "fp32"] = Field(
        default="fp32", validation_alias=_alias("MODEL_PRECISION")
    )
    chroma_host: str | None = Field(default=None, validation_alias=_alias("CHROMA_HOST"))
    chroma_port: int = Field(default=8000, validation_alias=_alias("CHROMA_PORT"))
    chroma_collection: str = "hostgpu"
    batch_size_text: int = Field(default=32, validation_alias=_alias("BATCH_SIZE_TEXT"))
    batch_size_visual: int = Field(default=4, validation_alias=_alias("BATCH_SIZE_VISUAL"))
    render_dpi: int = 100
    upload_root: Path | None = None
    ingest_roots: str = Field(
        default="",
        description="folders path-based ingest may read (os.pathsep-separated)",
    )
    ingest_gpu: str = "any"
    labels: str = Field(
        default="",
        description="this machine's labels, key=value,… (`hostgpu ray start` gives them to Ray)",
    )
    max_pages: int = Field(default=500, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0)
    max_text_bytes: int = Field(default=20_000_000, gt=0)
    # A file holding the secret a gateway's first start uses for its admin token (a
    # containerised gateway, whose admin token the host made: `hostgpu stack up`).
    admin_token_file: Path | None = None
    # `hostgpu stack`: the compose file (default: this checkout's deploy/hybrid/compose.yaml)
    # and the Compose project name (default: one derived from HOME).
    stack_compose_file: Path | None = None
    stack_project: str | None = None

    @property
    def home_dir(self) -> Path:
        path = self.home.expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'hostgpu.db'}"

    @property
    def admin_token_path(self) -> Path:
        return self.home_dir / "admin-token"

    @property
    def gateway_url_path(self) -> Path:
        return self.home_dir / "gateway-url"

    def resolved_gateway(self) -> str:
        """The gateway URL: the setting, else what the last local gateway wrote down."""
        if self.gateway:
            return self.gateway.rstrip("/")
        path = self.home.expanduser() / "gateway-url"
        if path.exists():
            return path.read_text().strip().rstrip("/")
        return f"http://127.0.0.1:{DEFAULT_PORT}"

    @property
    def allowed_ingest_roots(self) -> list[Path]:
        """Folders a path-based ingest job may read: HOSTGPU_INGEST_ROOTS and the upload root."""
        roots = [Path(p).expanduser() for p in self.ingest_roots.split(os.pathsep) if p.strip()]
        if self.upload_root is not None:
            roots.append(self.upload_root.expanduser())
        return [r.resolve() for r in roots]

    def resolved_token(self) -> str | None:
        """The API token: HOSTGPU_TOKEN, else HOSTGPU_TOKEN_FILE, else the local admin token."""
        if self.token:
            return self.token.strip()
        if self.token_file is not None:
            return read_secret(self.token_file)
        path = self.home.expanduser() / "admin-token"
        if path.exists():
            return read_secret(path)
        return None


def read_secret(path: Path) -> str:
    """A token from a file that only its owner can read (like ssh, refuse anything looser)."""
    path = path.expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"the token file {path} is readable by others (mode {mode & 0o777:o}): chmod 600 {path}"
        )
    if not text:
        raise ConfigError(f"the token file {path} is empty")
    return text


def write_private(path: Path, text: str) -> Path:
    """Write a file only its owner can read (created 0600, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)  # an older file may have had looser bits
    return path


def write_secret(path: Path, secret: str) -> Path:
    """Write a token to a file created 0600 (never world-readable, not even for a moment)."""
    return write_private(path.expanduser(), secret + "\n")


@lru_cache(maxsize=1)
def _cached(env_key: str) -> Settings:
    try:
        return Settings()
    except ValidationError as exc:  # say which variable, not a pydantic traceback
        problems = "; ".join(
            f"{_variable(error['loc'])}={error['input']!r}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigError(f"{problems} (fix or unset the variable)") from None


def _variable(loc: tuple[int | str, ...]) -> str:
    """The environment variable behind a validation error's location: an alias is its own
    name (DEVICE), a field is HOSTGPU_<FIELD>."""
    name = str(loc[0]) if loc else "?"
    return name if name.isupper() else f"HOSTGPU_{name.upper()}"


def get_settings() -> Settings:
    """Settings for the current environment (re-read when HOSTGPU_* variables change)."""
    key = "\0".join(f"{k}={v}" for k, v in sorted(os.environ.items()))
    return _cached(key)
