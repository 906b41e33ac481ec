"""One engine behind a minimal OpenAI-compatible HTTP server (no auth, no queue, no routing).

This is the inference benchmark's arm B (the engine behind the thinnest HTTP layer that
streams SSE). It shares its request parsing, error shape and SSE framing
(:mod:`hostgpu.inference.openai_schema`) with the gateway's ``/v1`` routes
(:mod:`hostgpu.gateway.routes.inference`), so the benchmark's B and C differ only in the path
between the client and the engine.

    python -m hostgpu.inference.server --model smollm2 --device cpu --port 8100

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /healthz``, and ``GET /v1/requests/{id}``: a finished request's engine figures (time to
first token from the request reaching the engine, duration, usage, finish reason), by the id in its
response's ``x-request-id`` header. The benchmark reads them to tell the engine's time from
the path's, as it does for the gateway's jobs.

A client that disconnects cancels its generation: a stream's generator is closed by the
server (``chat_sse`` cancels in its ``finally``), and a non-streaming request watches
``request.is_disconnected()`` while it waits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from hostgpu.inference import openai_schema as oa
from hostgpu.inference.engines.base import Completion, Engine, GenerationStream, TokenStream
from hostgpu.inference.errors import InferenceError, InvalidRequest, ModelNotFound

log = logging.getLogger("hostgpu.inference")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: How many requests ``GET /v1/requests/{id}`` remembers (the oldest are forgotten first).
RECENT_REQUESTS = 4096


def error_response(exc: InferenceError) -> JSONResponse:
    return JSONResponse(oa.error_body(exc), status_code=exc.status_code)


async def wait_or_disconnect(request: Request, stream: TokenStream) -> Completion | None:
    """The completion, or None (generation cancelled) when the client went away first."""
    done = asyncio.ensure_future(stream.acompletion())
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=0.25)
            if not done.done() and await request.is_disconnected():
                stream.cancel()
                return None
        return done.result()
    finally:
        if not done.done():
            done.cancel()
            with contextlib.suppress(asyncio.CancelledError, InferenceError):
                await done


def create_app(engines: Mapping[str, Engine]) -> FastAPI:
    """An app serving ``engines`` (loaded) by model name."""
    app = FastAPI(title="hostgpu inference (single engine)")
    #: Finished requests' engine figures, by id (only the figures: a prompt can be long).
    recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def keep(completion: Completion | None) -> None:
        if completion is None:  # cancelled before the engine finished it
            return
        recent[completion.id] = {k: v for k, v in asdict(completion).items() if k != "text"}
        while len(recent) > RECENT_REQUESTS:
            recent.popitem(last=False)

    async def kept(lines: AsyncIterator[str], stream: GenerationStream) -> AsyncIterator[str]:
        """``lines``, then the stream's figures kept once its last line went out."""
        try:
            async for line in lines:
                yield line
        finally:
            keep(stream.result())

    def engine_for(name: str) -> Engine:
        engine = engines.get(name)
        if engine is None:
            known = ", ".join(sorted(engines)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {known})")
        return engine

    @app.exception_handler(InferenceError)
    async def _inference_error(request: Request, exc: InferenceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(oa.invalid_request(exc.errors()))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"ok": True, "models": sorted(engines)}

    @app.get("/v1/models")
    async def models() -> oa.ModelList:
        return oa.ModelList(
            data=[
                oa.ModelCard(
                    id=name,
                    engine=engine.kind,
                    loaded_on=[{"device": engine.device}] if engine.loaded else [],
                )
                for name, engine in sorted(engines.items())
            ]
        )

    @app.get("/v1/requests/{request_id}", response_model=None)
    async def request_figures(request_id: str) -> dict[str, Any] | JSONResponse:
        figures = recent.get(request_id)
        if figures is None:
            detail = oa.ErrorDetail(
                message=f"no finished request {request_id!r} here (running, or forgotten)",
                type="invalid_request_error",
                code="not_found",
            )
            return JSONResponse(oa.ErrorResponse(error=detail).model_dump(), status_code=404)
        return figures

    async def _body(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise InvalidRequest("the body is not valid JSON") from None

    async def generate(
        request: Request, kind: type[oa.ChatCompletionRequest] | type[oa.CompletionRequest]
    ) -> Any:
        """Start generating; SSE for a streaming request, else the whole response once done."""
        body: oa.ChatCompletionRequest | oa.CompletionRequest = oa.parse_request(
            kind, await _body(request)
        )
        engine = engine_for(body.model)
        chat = isinstance(body, oa.ChatCompletionRequest)
        # Tokenising a long prompt takes milliseconds: keep it off the event loop.
        if isinstance(body, oa.ChatCompletionRequest):
            messages, params = body.chat_messages(), body.sampling_params()
            stream = await asyncio.to_thread(engine.chat, messages, params)
        else:
            prompt, params = body.prompt_text(), body.sampling_params()
            stream = await asyncio.to_thread(engine.complete, prompt, params)
        if body.stream:
            sse = oa.chat_sse if chat else oa.completion_sse
            lines = sse(stream, body.model, include_usage=body.include_usage)
            return StreamingResponse(
                kept(closing(lines), stream),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, "x-request-id": stream.id},
            )
        completion = await wait_or_disconnect(request, stream)
        if completion is None:
            return JSONResponse({}, status_code=499)
        keep(completion)
        respond = oa.chat_response if chat else oa.completion_response
        return JSONResponse(
            respond(completion, body.model).model_dump(mode="json"),
            headers={"x-request-id": stream.id},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        return await generate(request, oa.ChatCompletionRequest)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        return await generate(request, oa.CompletionRequest)

    return app


async def closing(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Close the SSE generator (which cancels generation) even when the client vanished."""
    try:
        async for line in lines:
            yield line
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from hostgpu.inference.engines import create_engine
    from hostgpu.inference.models import load_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="model name (repeatable)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, help="CPU threads for the engine (its `threads`)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # transformers' batching logs its set-up at INFO; keep this server's log to what it does.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
    registry = load_registry()
    engines: dict[str, Engine] = {}
    for name in args.model:
        spec = registry.get(name)
        if args.threads:
            key = "n_threads" if spec.engine == "llama.cpp" else "threads"
            spec = spec.model_copy(update={"options": {**spec.options, key: args.threads}})
        engine = create_engine(spec)
        engine.load(args.device)
        log.info("loaded %s on %s in %.1f s", name, args.device, engine.load_seconds or 0)
        engines[name] = engine
    try:
        uvicorn.run(create_app(engines), host=args.host, port=args.port, log_level="warning")
    finally:
        for engine in engines.values():
            engine.unload()


if __name__ == "__main__":
    main()
