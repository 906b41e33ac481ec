"""OpenAI's wire format for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Field names, types and defaults follow the ``openai`` Python package's types
(``openai.types.chat.completion_create_params``, ``ChatCompletion``, ``ChatCompletionChunk``,
``Completion``, ``Model``, the ``{"error": …}`` body), so the official client works unchanged.

Requests validate what an engine cannot honour, as a 400 in OpenAI's error shape (the message
says what to change): unknown roles, empty ``messages``, non-text content, ``n`` other than 1,
tools, more than four stop sequences, out-of-range temperature or top_p, prompts over
:data:`MAX_PROMPT_CHARS`. ``max_tokens`` over the model's context is refused by the engine
(``context_length_exceeded``) once the prompt is tokenised. Parameters hostgpu accepts and
does not act on (``user``, ``metadata``, ``store``…) are ignored, as OpenAI-compatible servers
do. ``ignore_eos`` (vLLM's extension, sent with the client's ``extra_body``) generates exactly
``max_tokens`` tokens, for benchmarks.

Streams are Server-Sent Events: one ``data: {chunk}`` line per delta, a last chunk with the
finish reason, a usage-only chunk (``choices: []``) when ``stream_options.include_usage`` is
set, then ``data: [DONE]``. :func:`chat_sse` and :func:`completion_sse` turn an engine's
:class:`~hostgpu.inference.engines.base.GenerationStream` into those lines.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hostgpu.inference.engines.base import (
    CHAT_ROLES,
    MAX_STOP_SEQUENCES,
    Completion,
    SamplingParams,
    TokenStream,
)
from hostgpu.inference.errors import InferenceError, InvalidRequest
from hostgpu.jsontext import body_problem

#: Characters of prompt text a request may carry (10 MB prompts are refused before tokenising).
MAX_PROMPT_CHARS = 1_000_000

Role = Literal["system", "developer", "user", "assistant", "tool"]
OpenAIFinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    # Unknown parameters are ignored, as OpenAI-compatible servers do (clients send newer ones).
    model_config = ConfigDict(extra="ignore")


# -- requests ---------------------------------------------------------------------------------
RequestT = TypeVar("RequestT", bound=_Request)


def _refused(message: str) -> Callable[[Any], Any]:
    """A validator for a parameter the engines do not implement: it may be sent unset (or 0,
    false, empty), but a request that sets it is refused rather than answered without it."""

    def refuse(value: Any) -> Any:
        if value:
            raise ValueError(message)
        return value

    return refuse


class ChatMessage(_Request):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in CHAT_ROLES:
            raise ValueError(f"role {value!r} is not one of {', '.join(CHAT_ROLES)}")
        return value

    def text(self) -> str:
        """The message's text (text parts joined); 400 for images, audio and files."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"content part of type {part.get('type')!r} is not supported: "
                    "hostgpu's models take text only",
                    param="messages",
                )
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class _Sampling(_Request):
    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    #: vLLM's extension: keep generating past end-of-sequence (exactly max_tokens tokens).
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only n=1 is supported: send several requests for more choices")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    _no_penalties = field_validator("presence_penalty", "frequency_penalty")(
        _refused("presence/frequency penalties are not supported; leave them at 0")
    )
    _no_bias = field_validator("logit_bias")(_refused("logit_bias is not supported"))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(stops),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    _no_logprobs = field_validator("logprobs")(_refused("logprobs are not supported"))
    _no_tools = field_validator("tools")(_refused("tools are not supported by hostgpu's engines"))

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and value.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported")
        return value

    def chat_messages(self) -> list[dict[str, str]]:
        """Role/content pairs for :meth:`Engine.chat`, checked against the size limit."""
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        return messages

    def sampling_params(self) -> SamplingParams:
        return self._params(self.max_completion_tokens or self.max_tokens)


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (legacy text completion)."""

    prompt: str | list[str]
    #: OpenAI's default for this endpoint is 16 tokens.
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request (a list must hold exactly one)")
        text = value if isinstance(value, str) else value[0]
        if not text:
            raise ValueError("prompt must not be empty")
        return value

    _unsupported = field_validator("echo", "suffix", "logprobs")(
        _refused("echo, suffix and logprobs are not supported")
    )

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return value

    def prompt_text(self) -> str:
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        check_prompt_chars(len(text), "prompt")
        return text

    def sampling_params(self) -> SamplingParams:
        return self._params(self.max_tokens)


def check_prompt_chars(chars: int, param: str) -> None:
    if chars > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"the prompt is {chars:,} characters; the limit is {MAX_PROMPT_CHARS:,} "
            "(and the model's context is far smaller): shorten it",
            param=param,
            code="prompt_too_large",
        )


def parse_request(model: type[RequestT], body: Any) -> RequestT:
    """Validate ``body`` as ``model``; InvalidRequest naming the first bad field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc.errors()) from None


def invalid_request(errors: Any) -> InvalidRequest:
    """An InvalidRequest from pydantic's (or FastAPI's) error list."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if (problem := body_problem(first)) is not None:
        return InvalidRequest(problem)  # no param: no field is to blame
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return InvalidRequest(f"{param}: {message}" if param else message, param=param)


# -- responses --------------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class _Choice(BaseModel):
    index: int = 0
    finish_reason: OpenAIFinishReason | None = None  # None: a stream chunk before the last
    logprobs: None = None


class _Envelope(BaseModel):
    """What every OpenAI completion object and stream chunk carries around its choices."""

    id: str
    created: int
    model: str
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Choice):
    delta: ChunkDelta


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]


class TextChoice(_Choice):
    text: str


class CompletionResponse(_Envelope):
    """A text completion, and (with ``finish_reason`` None) each of its stream chunks."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[TextChoice]


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``; the fields after ``owned_by`` are hostgpu's."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "hostgpu"
    engine: str | None = None
    #: Where the model is loaded now (worker and device), for routing and for people.
    loaded_on: list[dict[str, Any]] = Field(default_factory=list)
    #: The model servers that may serve it (the gateway's listing).
    servers: list[dict[str, Any]] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(exc: InferenceError) -> dict[str, Any]:
    """OpenAI's error shape for an inference error."""
    return ErrorResponse(
        error=ErrorDetail(message=exc.message, type=exc.error_type, param=exc.param, code=exc.code)
    ).model_dump()


# -- engine results → wire --------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def finish_reason(reason: str) -> OpenAIFinishReason:
    # A cancelled stream has no reader left; "error" never reaches a response (it raises).
    return "length" if reason == "length" else "stop"


def usage_info(completion: Completion) -> UsageInfo:
    u = completion.usage
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    )


def chat_response(completion: Completion, model: str) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=completion.text),
                finish_reason=finish_reason(completion.finish_reason),
            )
        ],
        usage=usage_info(completion),
    )


def completion_response(completion: Completion, model: str) -> CompletionResponse:
    return CompletionResponse(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=model,
        choices=[
            TextChoice(text=completion.text, finish_reason=finish_reason(completion.finish_reason))
        ],
        usage=usage_info(completion),
    )


SSE_DONE = "data: [DONE]\n\n"
#: An SSE comment: keeps proxies from closing a stream that waits in a queue.
SSE_KEEPALIVE = ": keep-alive\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _stream_sse(
    stream: TokenStream,
    piece: Callable[[str], str],
    ending: Callable[[OpenAIFinishReason], str],
    usage: Callable[[UsageInfo], str] | None,
    opening: str | None = None,
) -> AsyncIterator[str]:
    """SSE lines of a streamed completion: ``opening``, a ``piece`` per delta, the ``ending``
    with the finish reason, the ``usage`` chunk, ``[DONE]``. A failure after the headers is
    reported in-band, the way OpenAI's streams do; generation is cancelled if the reader goes
    away."""
    try:
        if opening is not None:
            yield opening
        async for delta in stream:
            yield piece(delta.text)
        completion = await stream.acompletion()
        yield ending(finish_reason(completion.finish_reason))
        if usage is not None:
            yield usage(usage_info(completion))
        yield SSE_DONE
    except InferenceError as exc:
        yield sse(error_body(exc))
        yield SSE_DONE
    finally:
        stream.cancel()


def chat_sse(stream: TokenStream, model: str, *, include_usage: bool = False) -> AsyncIterator[str]:
    """SSE lines of a streamed chat completion."""
    ident, created = new_id("chatcmpl"), int(time.time())

    def chunk(choices: list[ChunkChoice], usage: UsageInfo | None = None) -> str:
        envelope: dict[str, Any] = {"id": ident, "created": created, "model": model, "usage": usage}
        return sse(ChatCompletionChunk(**envelope, choices=choices))

    return _stream_sse(
        stream,
        lambda text: chunk([ChunkChoice(delta=ChunkDelta(content=text))]),
        lambda reason: chunk([ChunkChoice(delta=ChunkDelta(), finish_reason=reason)]),
        (lambda usage: chunk([], usage)) if include_usage else None,
        opening=chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))]),
    )


def completion_sse(
    stream: TokenStream, model: str, *, include_usage: bool = False
) -> AsyncIterator[str]:
    """SSE lines of a streamed text completion."""
    ident, created = new_id("cmpl"), int(time.time())

    def chunk(choices: list[TextChoice], usage: UsageInfo | None = None) -> str:
        envelope: dict[str, Any] = {"id": ident, "created": created, "model": model, "usage": usage}
        return sse(CompletionResponse(**envelope, choices=choices))

    return _stream_sse(
        stream,
        lambda text: chunk([TextChoice(text=text)]),
        lambda reason: chunk([TextChoice(text="", finish_reason=reason)]),
        (lambda usage: chunk([], usage)) if include_usage else None,
    )
