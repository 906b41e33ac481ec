"""Housekeeping (scope: admin)."""

from __future__ import annotations

from fastapi import APIRouter

from hostgpu.api import Pruned, PruneRequest
from hostgpu.gateway.deps import AdminToken, GatewayDep, run

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.post("/prune", response_model=Pruned)
async def prune(body: PruneRequest, gw: GatewayDep, _: AdminToken) -> Pruned:
    """Delete finished jobs older than ``older_than_s`` seconds."""
    return Pruned(deleted=await run(gw.store.prune, body.older_than_s))
