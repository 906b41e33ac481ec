"""FastAPI dependencies as Annotated aliases, and the one way routes call the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from anyio import to_thread
from fastapi import Depends, Request

from hostgpu.gateway.auth import require
from hostgpu.gateway.notify import Notifier
from hostgpu.settings import Settings
from hostgpu.store import Store, TokenInfo

T = TypeVar("T")

AdminToken = Annotated[TokenInfo, Depends(require("admin"))]
SubmitToken = Annotated[TokenInfo, Depends(require("submit"))]
WorkerToken = Annotated[TokenInfo, Depends(require("worker"))]
ReaderToken = Annotated[TokenInfo, Depends(require("submit", "worker"))]


# Async on purpose: FastAPI runs plain `def` dependencies in the thread pool, and three
# thread hops per request were a measurable part of a lease round trip.
async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_notifier(request: Request) -> Notifier:
    return request.app.state.notifier


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
NotifierDep = Annotated[Notifier, Depends(get_notifier)]


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call in the thread pool (the store is synchronous)."""
    return await to_thread.run_sync(lambda: fn(*args, **kwargs))
