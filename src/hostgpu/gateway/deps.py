"""FastAPI dependencies as Annotated aliases, and the one way routes call the store (``run``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from hostgpu.api import ID_PATTERN
from hostgpu.gateway.auth import require
from hostgpu.gateway.metrics import Metrics
from hostgpu.gateway.notify import Notifier
from hostgpu.gateway.resolver import Resolver
from hostgpu.gateway.threads import run as run  # the routes call the store through it
from hostgpu.gateway.waiting import WaitingExplainer
from hostgpu.settings import Settings
from hostgpu.store import Store
from hostgpu.tokens import SCOPES, TokenInfo

AdminToken = Annotated[TokenInfo, Depends(require("admin"))]
SubmitToken = Annotated[TokenInfo, Depends(require("submit"))]
ReadToken = Annotated[TokenInfo, Depends(require("read"))]
WorkerToken = Annotated[TokenInfo, Depends(require("worker"))]
#: The worker routes a lent machine uses too (each checks the worker is a lent one).
WorkerOrShare = Annotated[TokenInfo, Depends(require("worker", "share"))]
ReaderOrWorker = Annotated[TokenInfo, Depends(require("read", "worker"))]
AnyToken = Annotated[TokenInfo, Depends(require(*SCOPES))]

JobId = Annotated[
    str, Path(pattern=ID_PATTERN, description="a job id, or a unique prefix of 4+ hex digits")
]
WorkerId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="a worker id")]


# Async on purpose: FastAPI runs plain `def` dependencies in the thread pool, and three
# thread hops per request were a measurable part of a lease round trip.
async def get_store(request: Request) -> Store:
    return request.app.state.store


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_notifier(request: Request) -> Notifier:
    return request.app.state.notifier


async def get_resolver(request: Request) -> Resolver:
    return request.app.state.resolver


async def get_waiting(request: Request) -> WaitingExplainer:
    return request.app.state.waiting


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
NotifierDep = Annotated[Notifier, Depends(get_notifier)]
ResolverDep = Annotated[Resolver, Depends(get_resolver)]
WaitingDep = Annotated[WaitingExplainer, Depends(get_waiting)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
