"""First start: make sure somebody can administer the gateway."""

from __future__ import annotations

import os

from hostgpu.settings import Settings
from hostgpu.store import Store


def ensure_admin_token(store: Store, settings: Settings) -> str | None:
    """Create an admin token when the store has none; return where it was written."""
    if store.list_tokens():
        return None
    _, secret = store.create_token("admin (first start)", "admin")
    path = settings.admin_token_path
    # Written with 0600 from the start: the token is a password.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return str(path)
