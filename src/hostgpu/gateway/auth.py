"""Bearer tokens with scopes: admin ⊇ submit, worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anyio import to_thread
from fastapi import HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hostgpu.store import Store, TokenInfo
from hostgpu.store.interface import Scope

bearer = HTTPBearer(auto_error=False, description="A hostgpu token: `hostgpu token create`")


def require(*scopes: Scope) -> Callable[..., Awaitable[TokenInfo]]:
    """A dependency that admits tokens of ``scopes`` (admin tokens always pass)."""
    allowed = {"admin", *scopes}

    async def check(request: Request) -> TokenInfo:
        credentials: HTTPAuthorizationCredentials | None = await bearer(request)
        if credentials is None:
            raise HTTPException(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        store: Store = request.app.state.store
        info = await to_thread.run_sync(store.verify_token, credentials.credentials)
        if info is None:
            raise HTTPException(
                401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"}
            )
        if info.scope not in allowed:
            raise HTTPException(
                403,
                f"a {info.scope!r} token cannot do this; it needs scope "
                + " or ".join(sorted(allowed)),
            )
        return info

    check.__name__ = f"require_{'_'.join(scopes) or 'admin'}"
    return check
