"""Start-up: make sure somebody can administer the gateway."""

from __future__ import annotations

import logging
import time

from hostgpu.settings import Settings, write_secret
from hostgpu.store import Store
from hostgpu.tokens import hash_token, mint

log = logging.getLogger("hostgpu.gateway")


def ensure_admin_token(store: Store, settings: Settings) -> str | None:
    """Write a new admin token to ``HOSTGPU_HOME/admin-token`` (0600) when no admin token is
    active (first start, or every admin token revoked or expired); return where it went."""
    if store.has_active_admin():
        return None
    first = not store.list_tokens()
    info, secret = mint(
        "admin (first start)" if first else "admin (no active admin token at start)",
        "admin",
        now=time.time(),
    )
    store.add_token(info, hash_token(secret))
    path = write_secret(settings.admin_token_path, secret)
    if not first:
        log.warning("no admin token was active: wrote a new one to %s", path)
    return str(path)
