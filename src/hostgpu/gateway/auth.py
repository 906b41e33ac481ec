"""Bearer tokens with scopes (see :mod:`hostgpu.tokens` for what each scope may do)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from anyio import to_thread
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hostgpu.store import Store
from hostgpu.tokens import Scope, TokenInfo, admits, hash_token

#: Declared on every protected operation, so the OpenAPI schema, generated clients and the
#: docs page all know to send ``Authorization: Bearer <token>``.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="A hostgpu token (`hostgpu token create --scope …`)",
)


def require(*scopes: Scope) -> Callable[..., Awaitable[TokenInfo]]:
    """A dependency that admits tokens whose scope covers one of ``scopes`` (admin always)."""
    wanted = scopes or ("admin",)

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> TokenInfo:
        if credentials is None:
            raise HTTPException(
                401,
                "missing bearer token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        store: Store = request.app.state.store
        info = await to_thread.run_sync(store.verify_token, hash_token(credentials.credentials))
        if info is None:
            raise HTTPException(
                401,
                "invalid, expired or revoked token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not admits(info.scope, wanted):
            raise HTTPException(
                403,
                f"a {info.scope!r} token cannot do this; it needs scope "
                + " or ".join(sorted({*wanted, "admin"})),
            )
        return info

    check.__name__ = f"require_{'_'.join(wanted)}"
    return check
