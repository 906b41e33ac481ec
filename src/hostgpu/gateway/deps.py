"""FastAPI dependencies as Annotated aliases, and the one way routes call the store (``run``)."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import Depends, Path, Request

from hostgpu.api import ID_PATTERN, WORKER_ID_PATTERN
from hostgpu.gateway.auth import require
from hostgpu.gateway.metrics import Metrics
from hostgpu.gateway.notify import Notifier
from hostgpu.gateway.resolver import Resolver
from hostgpu.gateway.threads import run as run  # the routes call the store through it
from hostgpu.gateway.threads import spawn as spawn
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
WorkerId = Annotated[str, Path(pattern=WORKER_ID_PATTERN, description="a worker id")]


class Gateway(Protocol):
    """The services every route may use, kept on ``app.state`` by ``create_app``.

    One dependency for all of them: FastAPI resolves each dependency of each request on its
    own, and six of them were a measurable part of a no-op job's cost in the gateway."""

    store: Store
    settings: Settings
    notifier: Notifier
    resolver: Resolver
    waiting: WaitingExplainer
    metrics: Metrics


# Async on purpose: FastAPI runs plain `def` dependencies in the thread pool.
async def get_gateway(request: Request) -> Gateway:
    return cast(Gateway, request.app.state)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
