"""Create, list and revoke tokens (scope: admin); any token may read its own record."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from hostgpu.api import TokenCreated, TokenList, TokenRequest
from hostgpu.gateway.deps import AdminToken, AnyToken, GatewayDep, run
from hostgpu.gateway.routes.channel import recheck_tokens
from hostgpu.tokens import TOKEN_ID_PATTERN, TokenInfo, hash_token, mint

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
TokenId = Annotated[str, Path(pattern=TOKEN_ID_PATTERN)]


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenRequest, gw: GatewayDep, _: AdminToken) -> TokenCreated:
    """A new token; its secret is in this response only."""
    now = time.time()
    expires = now + body.expires_in_s if body.expires_in_s else None
    info, secret = mint(body.name, body.scope, now=now, expires_at=expires)
    await run(gw.store.add_token, info, hash_token(secret))
    return TokenCreated(token=secret, **info.model_dump())


@router.get("", response_model=TokenList)
async def list_tokens(gw: GatewayDep, _: AdminToken) -> TokenList:
    """Every token (never the secrets)."""
    return TokenList(tokens=await run(gw.store.list_tokens))


@router.get("/self", response_model=TokenInfo)
async def who_am_i(token: AnyToken) -> TokenInfo:
    """The record of the token that makes this request (any scope): its name, scope and
    expiry. The dashboard asks it to know which actions to offer."""
    return token


@router.delete("/{token_id}", response_model=TokenInfo)
async def revoke_token(
    token_id: TokenId,
    request: Request,
    gw: GatewayDep,
    _: AdminToken,
    force: Annotated[
        bool, Query(description="revoke even the last active admin token (locks admins out)")
    ] = False,
) -> TokenInfo:
    """Revoke a token; it stops working on the next request, on every gateway. The last active
    admin token is refused (409) unless ``force``."""
    echoed = gw.notifier.event("echo:tokens")
    info = await run(gw.store.revoke_token, token_id, force=force)
    request.app.state.tokens.clear()
    recheck_tokens(request.app)  # open worker channels: the token is checked as they open
    if gw.store.shared:
        # Every gateway's listener hears the revocation at the same moment as ours: once
        # ours has, the others have dropped the token from their caches too.
        await gw.notifier.wait(echoed, 2.0)
    return info
