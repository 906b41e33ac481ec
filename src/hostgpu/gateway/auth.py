"""Bearer tokens with scopes (see :mod:`hostgpu.tokens` for what each scope may do).

Verification is cached by token hash, so a request costs no store round trip and no thread
hop once its token is known. A revocation clears the cache at once on the gateway that made
it, and on every other gateway of the same PostgreSQL database as soon as the store's
LISTEN/NOTIFY event arrives (the revoking request waits for that event before it answers).
A lost event connection clears the cache too; entries also expire after a minute.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from hostgpu.gateway.threads import run
from hostgpu.store import Store
from hostgpu.tokens import Scope, TokenInfo, admits, hash_token

#: Declared on every protected operation, so the OpenAPI schema, generated clients and the
#: docs page all know to send ``Authorization: Bearer <token>``.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A hostgpu token (`hostgpu token create --scope …`)",
)


class TokenCache:
    """Valid tokens by hash (never a secret), for ``ttl`` seconds at most."""

    def __init__(self, ttl: float = 60.0, size: int = 10_000) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: dict[str, tuple[TokenInfo, float]] = {}

    def get(self, digest: str) -> TokenInfo | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        info, stored = entry
        if time.monotonic() - stored > self.ttl or not info.active(time.time()):
            self._entries.pop(digest, None)
            return None
        return info

    def put(self, digest: str, info: TokenInfo) -> None:
        if len(self._entries) >= self.size:
            self._entries.clear()
        self._entries[digest] = (info, time.monotonic())

    def clear(self) -> None:
        self._entries.clear()


async def verify(request: HTTPConnection, secret: str) -> TokenInfo | None:
    cache: TokenCache = request.app.state.tokens
    digest = hash_token(secret)
    info = cache.get(digest)
    if info is None:
        store: Store = request.app.state.store
        info = await run(store.verify_token, digest)
        if info is not None:
            cache.put(digest, info)
    return info


async def authorize(
    connection: HTTPConnection, secret: str | None, wanted: tuple[Scope, ...]
) -> TokenInfo:
    """The token behind ``secret`` if its scope covers one of ``wanted``; else HTTPException
    401 or 403 with the reason (a route's dependency, and a worker channel's handshake)."""
    if not secret:
        raise HTTPException(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    info = await verify(connection, secret)
    if info is None:
        raise HTTPException(
            401, "invalid, expired or revoked token", headers={"WWW-Authenticate": "Bearer"}
        )
    if not admits(info.scope, wanted):
        raise HTTPException(
            403,
            f"a {info.scope!r} token cannot do this; it needs scope "
            + " or ".join(sorted({*wanted, "admin"})),
        )
    return info


def require(*scopes: Scope) -> Callable[..., Awaitable[TokenInfo]]:
    """A dependency that admits tokens whose scope covers one of ``scopes`` (admin always)."""
    wanted = scopes or ("admin",)

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> TokenInfo:
        return await authorize(request, credentials.credentials if credentials else None, wanted)

    check.__name__ = f"require_{'_'.join(wanted)}"
    return check
