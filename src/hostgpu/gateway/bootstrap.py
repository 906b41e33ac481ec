"""Start-up: make sure somebody can administer the gateway."""

from __future__ import annotations

import logging
import time

from hostgpu.errors import ConfigError
from hostgpu.settings import Settings, write_secret
from hostgpu.store import Store
from hostgpu.tokens import hash_token, mint

log = logging.getLogger("hostgpu.gateway")

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
    """Make sure an admin token is active; return where its secret is kept when one was made.

    First start: the secret handed in through ``HOSTGPU_ADMIN_TOKEN_FILE``, else a new one
    written to ``HOSTGPU_HOME/admin-token`` (0600). A start that finds every admin token
    revoked or expired writes a new one there too, and says so: an admin must never be locked
    out for good.
    """
    if store.has_active_admin():
        return None
    first = not store.list_tokens()
    given = _given_secret(settings) if first else None
    info, secret = mint(
        "admin (first start)" if first else "admin (no active admin token at start)",
        "admin",
        now=time.time(),
    )
    store.add_token(info, hash_token(given or secret))
    if given is not None:
        return str(settings.admin_token_file)
    path = write_secret(settings.admin_token_path, secret)
    if not first:
        log.warning("no admin token was active: wrote a new one to %s", path)
    return str(path)
