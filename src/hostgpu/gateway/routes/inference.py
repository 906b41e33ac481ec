"""The OpenAI-compatible inference API (scope: infer): chat and text completions, models.

A request becomes a job of the durable queue (see :mod:`hostgpu.inference.jobs`) at
interactive priority, routed to a model server that serves the model, and its tokens come
back through the stream relay (:mod:`hostgpu.gateway.streams`) as OpenAI's SSE chunks, with
keep-alive comments while it waits in the queue. Errors use OpenAI's error shape. A client
that goes away cancels the job; its server stops generating at its next event.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from hostgpu.api import ERROR_RESPONSES
from hostgpu.capabilities import Capabilities
from hostgpu.errors import ConfigError
from hostgpu.gateway.auth import require
from hostgpu.gateway.deps import run
from hostgpu.gateway.quotas import Slot, TokenQuotas
from hostgpu.gateway.streams import RemoteStream, StreamHub, with_keepalive
from hostgpu.inference import openai_schema as oa
from hostgpu.inference.engines.base import SamplingParams, check_messages
from hostgpu.inference.errors import InferenceError, InvalidRequest, ModelNotFound, NoServer
from hostgpu.inference.jobs import (
    INFERENCE_FUNCTION,
    MODEL_LABEL_VALUE,
    GenerateRequest,
    model_label,
    served_models,
)
from hostgpu.inference.models import load_registry
from hostgpu.inference.server import SSE_HEADERS, closing, wait_or_disconnect
from hostgpu.jobs import JobSpec, Payload
from hostgpu.settings import Settings
from hostgpu.store import Store
from hostgpu.tokens import TokenInfo

#: Every error of these routes takes OpenAI's shape, the gateway's own refusals included
#: (a token, a body limit): documented so, over the gateway's general ``Problem``.
router = APIRouter(
    tags=["inference"],
    responses={
        status: {
            "model": oa.ErrorResponse,
            "description": f"{spec['description']} (OpenAI's shape)",
        }
        for status, spec in ERROR_RESPONSES.items()
    },
)

InferToken = Annotated[TokenInfo, Depends(require("infer"))]
ModelsToken = Annotated[TokenInfo, Depends(require("infer", "read"))]

#: Paths whose errors are in OpenAI's shape (validation errors included: see app.py).
OPENAI_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models"})
#: The header (OpenAI's name) that gives a completion's job id: `hostgpu job ID` shows where
#: and when it ran.
REQUEST_ID_HEADER = "x-request-id"


def openai_path(path: str) -> bool:
    """Whether ``path`` is one of OpenAI's routes, whose errors take OpenAI's shape."""
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion (JSON), or with `stream: true` its chunks as SSE",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **{
        status: {"model": oa.ErrorResponse, "description": text}
        for status, text in {
            400: "The request is not valid for the model (OpenAI's error shape)",
            429: "Over this token's rate or concurrency limit (Retry-After)",
            503: "No live model server serves the model (Retry-After)",
        }.items()
    },
}


def _servers(workers: list[Capabilities], model: str) -> list[Capabilities]:
    return [w for w in workers if model in served_models(w.labels)]


@router.get("/v1/models", response_model=oa.ModelList)
async def list_models(request: Request, _: ModelsToken) -> oa.ModelList:
    """The models live model servers serve, and where each is loaded now."""
    state = request.app.state
    hub: StreamHub = state.streams
    workers = await run(state.waiting.workers)
    names = sorted({m for w in workers for m in served_models(w.labels)})
    live = {w.name for w in workers}
    cards = []
    for name in names:
        loaded_on = [
            {"worker": hub.names.get(worker_id), "device": e.device, "active": e.active}
            for worker_id, engines in hub.engines.items()
            for e in engines
            if e.model == name and e.loaded and hub.names.get(worker_id) in live
        ]
        servers = _servers(workers, name)
        cards.append(
            oa.ModelCard(
                id=name,
                loaded_on=loaded_on,
                servers=[
                    {
                        "worker": w.name,
                        "devices": [d.torch_device for d in w.devices],
                        "shared": w.serves == "models" and "hostgpu.lender" in w.labels,
                    }
                    for w in servers
                ],
            )
        )
    return oa.ModelList(data=cards)


@router.get("/v1/models/{model:path}", response_model=oa.ModelCard)
async def get_model(model: str, request: Request, token: ModelsToken) -> oa.ModelCard:
    """One model's card, as in ``GET /v1/models`` (the ``openai`` client's
    ``models.retrieve``); 404 in OpenAI's shape when no live model server serves it."""
    for card in (await list_models(request, token)).data:
        if card.id == model:
            return card
    raise ModelNotFound(
        f"no live model server serves {model!r}: `hostgpu models` lists what is served"
    )


def _declared(store: Store, settings: Settings, model: str) -> bool:
    """Whether starting a model server may help a request for ``model``: this gateway's
    registry knows it (the built-ins, its models file), or a server declared it once (one
    that is down, draining or stopped). Read only when no live server serves it."""
    with contextlib.suppress(ConfigError):  # a broken models file: the servers' word only
        if model in load_registry(settings.home_dir, settings.models):
            return True
    return any(model in served_models(w.capabilities.labels) for w in store.list_workers())


async def _start(request: Request, gen: GenerateRequest) -> RemoteStream:
    """Queue the request as an inference job and open its stream."""
    state = request.app.state
    store, notifier, settings = state.store, state.notifier, state.settings
    # From memory when the caches are fresh, as they are under load: each thread hop lets the
    # other requests of a burst in before this one reaches the queue (and its engine).
    workers = state.waiting.cached()
    if workers is None:
        workers = await run(state.waiting.workers)
    if not _servers(workers, gen.model):
        if not await run(_declared, store, settings, gen.model):
            raise ModelNotFound(
                f"no model server has declared a model named {gen.model!r}, and this "
                "gateway's registry does not know it: register it on a model server's machine "
                "(models.toml in its HOSTGPU_HOME, or HOSTGPU_MODELS; `hostgpu models --all` "
                f"lists what a machine knows), then run `hostgpu serve {gen.model}` there"
            )
        raise NoServer(
            f"no worker can load {gen.model}: none of the live model servers serves it; start "
            f"one with `hostgpu serve {gen.model}` (or `hostgpu share --models {gen.model}` on "
            "a lender's machine)",
            param="model",
            code="model_not_available",
        )
    spec = JobSpec(
        function=INFERENCE_FUNCTION,
        payload=Payload(kwargs={"request": gen.model_dump(mode="json")}),
        labels={model_label(gen.model): MODEL_LABEL_VALUE},
    )
    started = time.time()
    declared = state.resolver.fresh([INFERENCE_FUNCTION])
    if declared is not None:
        new = state.resolver.new_jobs([spec], workers, inference=True, declared=declared)
    else:
        new = await run(state.resolver.new_jobs, [spec], workers, inference=True)
    # Requests sent at the same moment: one commit, one lease (group_commit.py, which
    # announces the jobs to the workers).
    [job] = await state.group_commit.enqueue(new)
    state.metrics.record_submitted([job], started)

    async def fetch() -> Any:
        return await run(store.get, job.id)

    async def cancel() -> None:
        try:
            await run(store.cancel, job.id)
        except Exception:  # finished meanwhile: nothing to cancel
            return
        notifier.notify("finished")

    return RemoteStream(state.streams, job.id, fetch, cancel)


async def _respond(
    request: Request,
    token: TokenInfo,
    gen: GenerateRequest,
    body: oa.ChatCompletionRequest | oa.CompletionRequest,
    *,
    sse: Callable[..., AsyncIterator[str]],
    whole: Callable[..., Any],
) -> Any:
    quotas: TokenQuotas = request.app.state.quotas
    slot = Slot()
    quotas.admit(token.id, slot)
    try:
        remote = await _start(request, gen)
    except BaseException:
        quotas.release(token.id, slot)
        raise
    remote.slot = slot  # held as long as the request is
    if body.stream:
        every = request.app.state.settings.infer_keepalive_seconds

        async def lines() -> AsyncIterator[str]:
            try:
                sse_lines = sse(remote, gen.model, include_usage=body.include_usage)
                async for line in with_keepalive(closing(sse_lines), every, oa.SSE_KEEPALIVE):
                    yield line
            finally:
                remote.cancel()  # a no-op once it finished
                quotas.release(token.id, slot)

        return StreamingResponse(
            lines(),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, REQUEST_ID_HEADER: remote.job_id},
        )
    try:
        completion = await wait_or_disconnect(request, remote)
    except InferenceError as exc:  # it ran and failed: say which job, for `hostgpu job`
        exc.request_id = remote.job_id
        raise
    finally:
        quotas.release(token.id, slot)
    if completion is None:
        return JSONResponse({}, status_code=499, headers={REQUEST_ID_HEADER: remote.job_id})
    answer = whole(completion, gen.model)
    return JSONResponse(answer.model_dump(mode="json"), headers={REQUEST_ID_HEADER: remote.job_id})


def _sampling(
    request: Request, body: oa.ChatCompletionRequest | oa.CompletionRequest
) -> SamplingParams:
    params = body.sampling_params()
    params.check()
    limit = request.app.state.settings.infer_max_tokens
    if params.max_tokens is not None and params.max_tokens > limit:
        raise InvalidRequest(
            f"max_tokens is {params.max_tokens}, over this gateway's limit of {limit} "
            "(HOSTGPU_INFER_MAX_TOKENS)",
            param="max_tokens",
        )
    return params


@router.post("/v1/chat/completions", response_model=None, responses=_RESPONSES)
async def chat_completions(
    body: oa.ChatCompletionRequest, request: Request, token: InferToken
) -> Any:
    """OpenAI's chat completions (``stream: true`` for SSE)."""
    sampling = _sampling(request, body)
    messages = body.chat_messages()
    check_messages(messages)
    gen = GenerateRequest(model=body.model, kind="chat", messages=messages, sampling=sampling)
    return await _respond(request, token, gen, body, sse=oa.chat_sse, whole=oa.chat_response)


@router.post("/v1/completions", response_model=None, responses=_RESPONSES)
async def completions(body: oa.CompletionRequest, request: Request, token: InferToken) -> Any:
    """OpenAI's (legacy) text completions (``stream: true`` for SSE)."""
    sampling = _sampling(request, body)
    gen = GenerateRequest(
        model=body.model, kind="completion", prompt=body.prompt_text(), sampling=sampling
    )
    return await _respond(
        request, token, gen, body, sse=oa.completion_sse, whole=oa.completion_response
    )
