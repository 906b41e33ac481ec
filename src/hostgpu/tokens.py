"""API tokens: scopes, minting and hashing. The store only persists what this module makes.

Scopes, narrowest first:

- ``read``: lists, job details, metrics, the dashboard's live view; nothing that changes state;
- ``submit``: jobs (submit, wait, cancel) and ``read``'s views;
- ``infer``: the OpenAI-compatible inference API (chat and text completions, models);
- ``worker``: join a pool and run published functions (register, lease, heartbeat, report);
- ``share``: lend a machine: the worker routes, for a machine that serves model engines only.
  The gateway registers it as such whatever it claims (it publishes only the inference
  function, so no other job is ever leased to it) and lets the token act only for the machine
  it registered, never for a function worker (whose jobs it would lease and read);
- ``admin``: everything, tokens included.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from typing import Literal, get_args

from pydantic import BaseModel, Field

Scope = Literal["admin", "submit", "worker", "read", "infer", "share"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
#: Token ids are 16 hex digits; a unique prefix of 4 or more names one too.
TOKEN_ID_LENGTH = 16
TOKEN_ID_PATTERN = r"^[0-9a-f]{4,32}$"
#: The shortest and longest lifetime a token may be given (``--expires``, ``expires_in_s``):
#: under a second it would be expired before its first use.
MIN_LIFETIME_S = 1
MAX_LIFETIME_S = 10 * 365 * 86400


class TokenInfo(BaseModel):
    """A token's record (never its secret)."""

    id: str
    name: str
    scope: Scope
    created_at: float = Field(description="UNIX time")
    expires_at: float | None = Field(default=None, description="UNIX time; null: never")
    revoked_at: float | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


def hash_token(secret: str) -> str:
    # Tokens are 256 random bits, so a plain SHA-256 is enough: there is nothing to
    # brute-force, and lookups by hash stay a single indexed read.
    return hashlib.sha256(secret.encode()).hexdigest()


def mint(
    name: str, scope: Scope, *, now: float, expires_at: float | None = None
) -> tuple[TokenInfo, str]:
    """A new token record and its secret (shown once; only the hash is stored)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)}")
    secret = f"hg{scope[0]}_{secrets.token_urlsafe(32)}"
    info = TokenInfo(
        id=uuid.uuid4().hex[:TOKEN_ID_LENGTH],
        name=name,
        scope=scope,
        created_at=now,
        expires_at=expires_at,
    )
    return info, secret


#: Which scopes a route needing a scope admits (admin always passes).
IMPLIED: dict[Scope, frozenset[Scope]] = {
    "read": frozenset({"read", "submit"}),
    "submit": frozenset({"submit"}),
    "infer": frozenset({"infer"}),
    "worker": frozenset({"worker"}),  # not "share": the worker routes admit it on their own
    "share": frozenset({"share"}),
    "admin": frozenset(),
}


def admits(token_scope: Scope, needed: tuple[Scope, ...]) -> bool:
    """Whether a token of ``token_scope`` may call a route that needs one of ``needed``."""
    if token_scope == "admin":
        return True
    return any(token_scope in IMPLIED[n] or token_scope == n for n in needed)
