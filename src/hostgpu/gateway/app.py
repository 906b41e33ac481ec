"""The gateway application factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import hostgpu
from hostgpu.api import ERROR_RESPONSES
from hostgpu.errors import (
    AmbiguousId,
    DuplicateKey,
    HostGPUError,
    InputNotUploaded,
    InvalidInput,
    InvalidTransition,
    LastAdminToken,
    NotFound,
    StoreUnavailable,
)
from hostgpu.gateway.apidocs import install_docs
from hostgpu.gateway.auth import TokenCache
from hostgpu.gateway.dashboard import mount_dashboard
from hostgpu.gateway.deps import Gateway, ReadToken
from hostgpu.gateway.group_commit import GroupCommit
from hostgpu.gateway.handoff import Handoff
from hostgpu.gateway.intake import announce
from hostgpu.gateway.limits import BodyLimitMiddleware
from hostgpu.gateway.metrics import Metrics
from hostgpu.gateway.notify import Notifier
from hostgpu.gateway.quotas import TokenQuotas
from hostgpu.gateway.resolver import Resolver
from hostgpu.gateway.routes import (
    admin,
    blobs,
    channel,
    events,
    hooks,
    inference,
    jobs,
    stats,
    tokens,
    workers,
)
from hostgpu.gateway.streams import StreamHub, gone_servers, tell_engines
from hostgpu.gateway.threads import run
from hostgpu.gateway.waiting import WaitingExplainer
from hostgpu.inference import openai_schema as oa
from hostgpu.inference.errors import InferenceError, InvalidRequest
from hostgpu.jsontext import body_problem
from hostgpu.retry import RetryPolicy
from hostgpu.settings import Settings, get_settings
from hostgpu.store import Store, open_store

log = logging.getLogger("hostgpu.gateway")


#: How often a gateway describes its model servers to the others (PostgreSQL).
ENGINES_EVERY_S = 5.0


class MetricsMiddleware:
    """Count and time requests by route template (pure ASGI: cheap on the hot path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


async def _housekeeping(app: FastAPI, interval: float, grace: float, expiry_every: float) -> None:
    """Take back expired leases and settle jobs waiting for declarations; every gateway runs
    this, the store makes it safe.

    Expiry waits ``grace`` (one lease period) after start: leases may have run out while this
    gateway was down, through no fault of their workers, which re-extend them with their
    next heartbeat. A worker that really died loses its jobs one lease period later.
    """
    store: Store = app.state.store
    resolver: Resolver = app.state.resolver
    waiting: WaitingExplainer = app.state.waiting
    notifier: Notifier = app.state.notifier
    hub: StreamHub = app.state.streams
    expire_from = time.monotonic() + grace
    next_expiry = next_settle = next_told = 0.0
    while True:
        now = time.monotonic()
        try:
            if hub.engines and now >= next_told:
                next_told = now + ENGINES_EVERY_S
                # Servers that died without deregistering no longer count as warm...
                with contextlib.suppress(HostGPUError):  # (the database is away: next time)
                    hub.prune(await run(gone_servers, store, list(hub.engines)))
                # ...and gateways that started since the last change hear of the others.
                if store.shared and (servers := hub.local_servers()):
                    await tell_engines(store, hub, servers)
            if now >= expire_from and now >= next_expiry:
                next_expiry = now + expiry_every
                expired = await run(store.expire_leases)
                if expired:
                    log.warning(
                        "re-queued %d job(s) whose worker stopped heartbeating", len(expired)
                    )
                    notifier.runnable(None)
                    ids = {e.worker_id for e in expired if e.worker_id}
                    names = await run(_worker_names, store, ids)
                    app.state.metrics.record_expired(expired, names)
            # Pending jobs are rare: look for them every second only while some may exist.
            if resolver.pending_hint or now >= next_settle:
                next_settle = now + 30.0
                workers = await run(waiting.workers)
                if await run(resolver.settle_pending, workers):
                    notifier.runnable(None)
        except Exception:  # keep the loop alive through a database blip
            log.exception("housekeeping failed; retrying")
        await asyncio.sleep(interval)


def _worker_names(store: Store, ids: set[str]) -> dict[str, str]:
    names = {}
    for worker_id in ids:
        with contextlib.suppress(NotFound):
            names[worker_id] = store.get_worker(worker_id).capabilities.name
    return names


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or get_settings()
    store = store or open_store(
        settings.resolved_database_url,
        retry=RetryPolicy(
            base_s=settings.retry_base_seconds,
            max_s=settings.retry_max_seconds,
            max_lost=settings.max_lost_leases,
        ),
        fallback_grace_s=settings.fallback_grace_seconds,
        worker_ttl_s=settings.worker_ttl_seconds,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        notifier: Notifier = app.state.notifier
        notifier.attach(asyncio.get_running_loop())
        notifier.on("tokens", app.state.tokens.clear)
        notifier.on("resync", app.state.tokens.clear)
        notifier.on("tokens", lambda: channel.recheck_tokens(app))
        notifier.on("resync", lambda: channel.recheck_tokens(app))
        hub: StreamHub = app.state.streams
        notifier.on("finished", hub.recheck)
        notifier.on("resync", hub.recheck)
        loop = asyncio.get_running_loop()

        def heard(topic: str) -> None:  # the store's listener thread
            if topic.startswith(("stream:", "engines:")):  # for the stream hub
                kind, _, payload = topic.partition(":")
                handle = hub.heard if kind == "stream" else hub.heard_engines
                if not loop.is_closed():  # (the listener may outlive the app by a poll)
                    loop.call_soon_threadsafe(handle, payload)
            elif not topic.startswith(("echo:stream:", "echo:engines:")):
                notifier.heard_from_store(topic)

        stop_listening = store.subscribe(heard)
        # Expired leases are looked for twice per lease period (a read when there are none):
        # an idle gateway costs the database next to nothing, and a dead worker's jobs come
        # back within one and a half lease periods.
        task = asyncio.create_task(
            _housekeeping(
                app,
                min(1.0, settings.lease_seconds / 4),
                grace=settings.lease_seconds,
                expiry_every=settings.lease_seconds / 2,
            )
        )
        try:
            yield
        finally:
            stop_listening()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="hostgpu gateway",
        version=hostgpu.__version__,
        description="Routes jobs to workers that really have the accelerator they need.",
        lifespan=lifespan,
        docs_url=None,  # apidocs.install_docs: the same page, without a CDN
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.store = store
    app.state.notifier = Notifier()
    app.state.group_commit = GroupCommit(
        store,
        on_stored=lambda new: announce(app.state.notifier, settings, new),
        handoff=Handoff(cast(Gateway, app.state)),
    )
    app.state.waiting = WaitingExplainer(store)
    app.state.resolver = Resolver(store)
    app.state.tokens = TokenCache()
    app.state.touched = {}  # worker id → when this gateway last marked it alive
    app.state.drained = {}  # worker id → the notifier generation its last short lease read saw
    app.state.channels = {}  # worker id → its open channel on this gateway
    app.state.streams = StreamHub()
    app.state.notifier.preference = app.state.streams.preference
    app.state.quotas = TokenQuotas(settings.infer_rate_per_minute, settings.infer_concurrency)

    metrics = Metrics(store)
    app.state.metrics = metrics

    for router in (
        jobs.router,
        workers.router,
        channel.router,
        tokens.router,
        admin.router,
        hooks.router,
        stats.router,
        events.router,
        blobs.router,
        inference.router,
    ):
        app.include_router(router, responses=ERROR_RESPONSES)

    _install_error_handlers(app)

    @app.get("/healthz", tags=["system"])
    async def healthz() -> dict[str, Any]:
        """Liveness and store reachability (no token needed)."""
        await run(store.health)
        return {"status": "ok", "version": hostgpu.__version__}

    @app.get("/metrics", tags=["system"], response_class=Response, responses=ERROR_RESPONSES)
    async def prometheus(_: ReadToken) -> Response:
        """Prometheus metrics (scope: read)."""
        body = await run(generate_latest, metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    mount_dashboard(app)

    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        exempt=("/v1/blobs/",),
        error_body=_error_body,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    statuses: list[tuple[type[HostGPUError], int]] = [
        (NotFound, 404),
        (AmbiguousId, 400),
        (InvalidTransition, 409),
        (DuplicateKey, 409),
        (LastAdminToken, 409),
        (InputNotUploaded, 409),
        (InvalidInput, 422),
        (StoreUnavailable, 503),
        (HostGPUError, 400),
    ]
    for exc_type, status in statuses:

        async def handler(_: Request, exc: Exception, status: int = status) -> JSONResponse:
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)

        app.add_exception_handler(exc_type, handler)

    async def inference_error(_: Request, exc: Exception) -> JSONResponse:
        # The inference routes answer as OpenAI's API does, so its clients read the reason.
        assert isinstance(exc, InferenceError)
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after else {}
        if exc.request_id:
            headers[inference.REQUEST_ID_HEADER] = exc.request_id
        return JSONResponse(oa.error_body(exc), status_code=exc.status_code, headers=headers)

    app.add_exception_handler(InferenceError, inference_error)

    async def validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if inference.openai_path(request.url.path):
            return JSONResponse(oa.error_body(oa.invalid_request(exc.errors())), 400)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        summary = "; ".join(
            body_problem(e) or f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}"
            for e in exc.errors()[:5]
        )
        return JSONResponse({"detail": f"invalid request: {summary}", "errors": errors}, 422)

    app.add_exception_handler(RequestValidationError, validation)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route that matched the path;
            # a path served by several routes (GET and POST /v1/jobs) needs them all.
            allowed = _allowed_methods(request) or sorted(
                m.strip() for m in headers.get("Allow", "").split(",") if m.strip()
            )
            headers["Allow"] = ", ".join(allowed)
            detail = f"{request.method} is not allowed on {request.url.path}: use " + " or ".join(
                allowed
            )
            return JSONResponse(_error_body(request.url.path, detail), 405, headers=headers)
        if inference.openai_path(request.url.path):
            body = _error_body(request.url.path, str(exc.detail))
            return JSONResponse(body, exc.status_code, headers=headers)
        return await http_exception_handler(request, exc)

    app.add_exception_handler(StarletteHTTPException, http_error)


def _error_body(path: str, detail: str) -> dict[str, Any]:
    """An error's body: ``{"detail": …}``, or on the inference routes OpenAI's shape, which
    their clients (the ``openai`` package among them) read."""
    if inference.openai_path(path):
        return oa.error_body(InvalidRequest(detail))
    return {"detail": detail}


def _allowed_methods(request: Request) -> list[str]:
    """Every method the API serves on this path, from the OpenAPI document's templates."""
    table: list[tuple[re.Pattern[str], set[str]]] | None = getattr(
        request.app.state, "allowed_methods", None
    )
    if table is None:
        table = []
        for template, operations in request.app.openapi()["paths"].items():
            regex, _, _ = compile_path(template)
            methods = {m.upper() for m in operations}
            table.append((regex, methods | ({"HEAD"} if "GET" in methods else set())))
        request.app.state.allowed_methods = table
    path = request.url.path
    matches = [(regex, methods) for regex, methods in table if regex.match(path)]
    # A path that a template names outright (/v1/jobs/batch) is that route's alone, not also
    # /v1/jobs/{job_id}'s, whose id pattern would refuse "batch".
    exact = [methods for regex, methods in matches if "(?P<" not in regex.pattern]
    return sorted({m for methods in (exact or [m for _, m in matches]) for m in methods})
