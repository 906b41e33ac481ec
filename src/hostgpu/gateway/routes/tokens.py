"""Create, list and revoke tokens (scope: admin)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query

from hostgpu.api import TokenCreated, TokenList, TokenRequest
from hostgpu.gateway.deps import AdminToken, StoreDep, run
from hostgpu.tokens import TOKEN_ID_PATTERN, TokenInfo, hash_token, mint

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])
TokenId = Annotated[str, Path(pattern=TOKEN_ID_PATTERN)]


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenRequest, store: StoreDep, _: AdminToken) -> TokenCreated:
    """A new token; its secret is in this response only."""
    now = time.time()
    expires = now + body.expires_in_s if body.expires_in_s else None
    info, secret = mint(body.name, body.scope, now=now, expires_at=expires)
    await run(store.add_token, info, hash_token(secret))
    return TokenCreated(token=secret, **info.model_dump())


@router.get("", response_model=TokenList)
async def list_tokens(store: StoreDep, _: AdminToken) -> TokenList:
    """Every token (never the secrets)."""
    return TokenList(tokens=await run(store.list_tokens))


@router.delete("/{token_id}", response_model=TokenInfo)
async def revoke_token(
    token_id: TokenId,
    store: StoreDep,
    _: AdminToken,
    force: Annotated[
        bool, Query(description="revoke even the last active admin token (locks admins out)")
    ] = False,
) -> TokenInfo:
    """Revoke a token; it stops working on the next request. The last active admin token is
    refused (409) unless ``force``."""
    return await run(store.revoke_token, token_id, force=force)
