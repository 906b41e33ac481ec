"""Create, list and revoke tokens (scope: admin)."""

from __future__ import annotations

from fastapi import APIRouter

from hostgpu.gateway.deps import AdminToken, StoreDep, run
from hostgpu.gateway.schemas import TokenCreated, TokenList, TokenOut, TokenRequest

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenRequest, store: StoreDep, _: AdminToken) -> TokenCreated:
    """A new token; its secret is in this response only."""
    info, secret = await run(store.create_token, body.name, body.scope)
    return TokenCreated(token=secret, **info.__dict__)


@router.get("", response_model=TokenList)
async def list_tokens(store: StoreDep, _: AdminToken) -> TokenList:
    """Every token (never the secrets)."""
    return TokenList(tokens=[TokenOut(**t.__dict__) for t in await run(store.list_tokens)])


@router.delete("/{token_id}", response_model=TokenOut)
async def revoke_token(token_id: str, store: StoreDep, _: AdminToken) -> TokenOut:
    """Revoke a token; it stops working on the next request."""
    return TokenOut(**(await run(store.revoke_token, token_id)).__dict__)
