"""First start: make sure somebody can administer the gateway."""

from __future__ import annotations

import os

from hostgpu.errors import ConfigError
from hostgpu.settings import Settings
from hostgpu.store import Store

#: A secret handed in through HOSTGPU_ADMIN_TOKEN_FILE must be at least this long.
MIN_SECRET_CHARS = 32


def _given_secret(settings: Settings) -> str | None:
    """The admin secret from ``HOSTGPU_ADMIN_TOKEN_FILE``, when one is configured.

    A containerised gateway cannot hand its token to the host safely, so the host makes
    the secret (``hostgpu stack up``), writes it 0600 and mounts the file read-only.
    """
    path = settings.admin_token_file
    if path is None:
        return None
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"HOSTGPU_ADMIN_TOKEN_FILE {path} cannot be read: {exc}") from None
    if len(secret) < MIN_SECRET_CHARS or any(c.isspace() for c in secret):
        raise ConfigError(
            f"HOSTGPU_ADMIN_TOKEN_FILE {path} must hold one secret of at least "
            f"{MIN_SECRET_CHARS} characters without spaces"
        )
    return secret


def ensure_admin_token(store: Store, settings: Settings) -> str | None:
    """Create an admin token when the store has none; return where its secret is kept."""
    if store.list_tokens():
        return None
    given = _given_secret(settings)
    if given is not None:
        store.create_token("admin (first start)", "admin", secret=given)
        return str(settings.admin_token_file)
    _, secret = store.create_token("admin (first start)", "admin")
    path = settings.admin_token_path
    # Written with 0600 from the start: the token is a password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return str(path)
