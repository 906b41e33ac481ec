"""One small interface for every inference engine.

An engine holds one model on one device and serves many requests at once::

    engine = create_engine(registry.get("smollm2"))
    engine.load("cpu")                      # or "cuda:0", "mps"
    stream = engine.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    for delta in stream:                    # text as the tokens are produced
        print(delta.text, end="")
    stream.completion().usage               # prompt/completion token counts, finish reason
    engine.unload()

:meth:`Engine.chat`, :meth:`Engine.complete` and :meth:`Engine.submit` may be called from any
number of threads; each returns a :class:`GenerationStream` at once (generation runs on the
engine's own thread, which batches concurrent requests). A stream is iterated synchronously
(``for``) or from asyncio (``async for``), and :meth:`GenerationStream.cancel` stops the
generation at the engine's next step.

What every engine shares lives here, so they all behave the same: request validation (context
length, parameters), incremental detokenisation (a multi-byte character split across tokens is
held until complete), stop sequences (text is held back while it could be the start of one,
and the stop text itself is never emitted), ``max_tokens``, end-of-sequence, usage counts and
the finish reason. An engine implements only loading, tokenising and the decode loop: it hands
each sampled token to :meth:`ActiveRequest.emit`, which says whether to go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import ConfigDict

from hostgpu.inference.errors import EngineError, InvalidRequest
from hostgpu.inference.models import ModelSpec

FinishReason = Literal["stop", "length", "cancelled", "error"]
Message = Mapping[str, Any]

#: Roles a chat template understands; OpenAI's ``developer`` is the newer name of ``system``.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
T = TypeVar("T")


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. ``temperature=0`` is greedy (argmax, deterministic).

    Also the wire form inside an inference job's payload: pydantic validates it there, and
    refuses fields it does not know.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Keep generating past end-of-sequence (benchmarks need an exact token count).
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self) -> None:
        """Raise InvalidRequest for values no engine accepts."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        if not 0 <= self.temperature <= 2:
            raise InvalidRequest("temperature must be between 0 and 2", param="temperature")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise InvalidRequest(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop"
            )
        if any(not s for s in self.stop):
            raise InvalidRequest("stop sequences must not be empty", param="stop")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class StreamDelta:
    """New text, and how many tokens were sampled since the previous delta."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Completion:
    """A finished generation."""

    id: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    #: Seconds from submission to the first sampled token, and to the end.
    time_to_first_token: float | None
    duration: float


@dataclass(frozen=True)
class EngineStats:
    """Load on an engine, for routing (least pressure) and for status lines."""

    loaded: bool
    device: str | None
    active_requests: int
    #: Tokens still to generate for the active requests (at most their max_tokens).
    pending_tokens: int
    requests_total: int
    generated_tokens_total: int


# -- text: incremental detokenising and stop sequences ---------------------------------------
class IncrementalDecoder:
    """Turns token ids into text deltas without splitting characters or word spacing.

    Decoding token by token breaks multi-byte characters (a byte-level BPE token can hold half
    of one) and, with SentencePiece, the space before a word. So it decodes a short window
    twice (with and without the new tokens, from the same start) and emits the difference,
    holding it while it ends in U+FFFD, the mark of an incomplete character. This is the
    scheme of Hugging Face's text-generation-inference and vLLM.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self._tokens.append(token)
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._tokens)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return text[len(prefix_text) :]


class StopMatcher:
    """Finds stop sequences in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop sequence was reached."""
        if not self._stops:
            return text, False
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:size]):
                    keep = size
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


# -- the channel between an engine thread and a consumer -------------------------------------
_END = object()


class _Channel:
    """A queue one engine thread fills and one consumer drains, from a thread or asyncio."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def put(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, event in wakers:
            # The loop may be closed when a consumer went away without draining: harmless.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def get(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no token within the timeout")
                self._cond.wait(remaining)
            return self._items.popleft()

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._wakers.append((loop, event))
        try:
            while True:
                with self._cond:
                    if self._items:
                        return self._items.popleft()
                    event.clear()
                await event.wait()
        finally:
            with self._cond:
                self._wakers.remove((loop, event))


# -- requests ---------------------------------------------------------------------------------
class ActiveRequest:
    """One generation, as the engine's thread sees it.

    The engine calls :meth:`emit` for each sampled token (it returns False when the request is
    done: end-of-sequence, a stop sequence, ``max_tokens``, or cancelled) and :meth:`release`
    once it no longer computes anything for it. :meth:`fail` ends it with an error.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        eos_ids: frozenset[int],
        decode: Callable[[list[int]], str],
    ) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.generated = 0
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.released = threading.Event()
        self._decoder = IncrementalDecoder(decode)
        self._stops = StopMatcher(params.stop)
        self._channel = _Channel()
        self._lock = threading.Lock()
        self._pending_tokens = 0
        self._text: list[str] = []
        #: Set by the engine: how to stop computing this request from another thread.
        self.on_cancel: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return 0 if self.done else self.max_tokens - self.generated

    def emit(self, token: int) -> bool:
        """Take one sampled token; False when the engine should stop generating for it."""
        with self._lock:
            if self.done:
                return False
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.generated += 1
            self._pending_tokens += 1
            if token in self.eos_ids:
                self._finish_locked("stop")
                return False
            text, stopped = self._stops.feed(self._decoder.push(token))
            if stopped:
                self._send_locked(text)
                self._finish_locked("stop", flush=False)
                return False
            if text:
                self._send_locked(text)
            if self.generated >= self.max_tokens:
                self._finish_locked("length")
                return False
            return True

    def finish(self, reason: FinishReason = "stop") -> None:
        """The engine ended the request on its own (its own stop condition or its end)."""
        with self._lock:
            if not self.done:
                self._finish_locked("length" if self.generated >= self.max_tokens else reason)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if not self.done:
                self.error = error
                self._finish_locked("error", flush=False)
        self.release()

    def cancel(self) -> bool:
        """Stop the request (from any thread); True if it was still running."""
        with self._lock:
            if self.done:
                return False
            self._finish_locked("cancelled", flush=False)
        if self.on_cancel is not None:
            self.on_cancel()
        return True

    def release(self) -> None:
        """The engine no longer computes anything for this request."""
        self.released.set()

    def _send_locked(self, text: str) -> None:
        if text:
            self._text.append(text)
            self._channel.put(StreamDelta(text, self._pending_tokens))
            self._pending_tokens = 0

    def _finish_locked(self, reason: FinishReason, *, flush: bool = True) -> None:
        if flush:
            text, stopped = self._stops.feed(self._decoder.flush())
            self._send_locked(text if stopped else text + self._stops.flush())
        self.finish_reason = reason
        self.finished_at = time.perf_counter()
        self._channel.put(_END)

    def completion(self) -> Completion:
        assert self.finish_reason is not None and self.finished_at is not None
        return Completion(
            id=self.id,
            text="".join(self._text),
            finish_reason=self.finish_reason,
            usage=Usage(len(self.prompt_ids), self.generated),
            time_to_first_token=(
                None if self.first_token_at is None else self.first_token_at - self.created
            ),
            duration=self.finished_at - self.created,
        )


class GenerationStream:
    """A running generation: iterate it (sync or async) for text deltas, or cancel it."""

    def __init__(self, request: ActiveRequest) -> None:
        self._request = request
        self._ended = False

    @property
    def id(self) -> str:
        return self._request.id

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt_ids)

    @property
    def max_tokens(self) -> int:
        return self._request.max_tokens

    @property
    def done(self) -> bool:
        return self._request.done

    @property
    def decoding(self) -> bool:
        """Past its first token and not finished: it yields a token at each engine step."""
        return self._request.first_token_at is not None and not self._request.done

    def text(self) -> str:
        """The text it has produced so far (without reading the stream)."""
        with self._request._lock:
            return "".join(self._request._text)

    def _check(self, item: Any) -> StreamDelta | None:
        if item is _END:
            self._ended = True
            error = self._request.error
            if error is not None:
                if isinstance(error, EngineError):
                    raise error
                raise EngineError(f"generation failed: {error}") from error
            return None
        assert isinstance(item, StreamDelta)
        return item

    def _get(self, timeout: float | None = None) -> StreamDelta | None:
        if self._ended:
            return self._check(_END)
        return self._check(self._request._channel.get(timeout))

    def __iter__(self) -> Iterator[StreamDelta]:
        while (delta := self._get()) is not None:
            yield delta

    def next(self, timeout: float | None = None) -> StreamDelta | None:
        """The next delta, None at the end; TimeoutError when nothing came within ``timeout``."""
        return self._get(timeout)

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        while not self._ended:
            delta = self._check(await self._request._channel.aget())
            if delta is None:
                break
            yield delta
        else:
            self._check(_END)

    def cancel(self) -> bool:
        """Stop generating (the engine drops the request at its next step)."""
        return self._request.cancel()

    def wait_released(self, timeout: float | None = None) -> bool:
        """Wait until the engine has stopped computing this request."""
        return self._request.released.wait(timeout)

    def result(self) -> Completion | None:
        """The whole completion once the engine has finished it, else None. It reads nothing
        from the stream, so whoever iterates the stream still gets every delta."""
        if self._request.finished_at is None or self._request.error is not None:
            return None
        return self._request.completion()

    def completion(self) -> Completion:
        """Wait for the end and return the whole completion (raises EngineError on failure)."""
        for _ in self:
            pass
        return self._request.completion()

    async def acompletion(self) -> Completion:
        async for _ in self:
            pass
        return self._request.completion()


class TokenStream(Protocol):
    """What a response is written from: an engine's :class:`GenerationStream`, or the
    gateway's relay of one that runs on a model server."""

    def __aiter__(self) -> AsyncIterator[StreamDelta]: ...

    async def acompletion(self) -> Completion: ...

    def cancel(self) -> bool: ...


# -- engines ----------------------------------------------------------------------------------
_ids = itertools.count(1)


class Engine(ABC):
    """A model on a device, serving concurrent streaming requests."""

    #: The engine's name in model specs.
    kind: ClassVar[str]

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device: str | None = None
        self.load_seconds: float | None = None
        self._state_lock = threading.Lock()
        self._active: dict[str, ActiveRequest] = {}
        self._requests_total = 0
        self._generated_total = 0
        #: Set by ``_load``: the most tokens one request may hold, and the ending token ids.
        self._context = 0
        self._eos: frozenset[int] = frozenset()
        #: The most tokens one step of its batching computes, prefill included (None: it
        #: does not say). Requests whose prompts fill a step need not wait for more to be
        #: tokenized before they are submitted: the step is full either way.
        self.step_tokens: int | None = None

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def loaded(self) -> bool:
        return self.device is not None

    def load(self, device: str = "cpu") -> None:
        """Load the model onto ``device`` (``cpu``, ``cuda:0``, ``mps``); idempotent."""
        with self._state_lock:
            if self.device == device:
                return
            if self.device is not None:
                raise EngineError(
                    f"{self.spec.name} is loaded on {self.device}; unload() before moving it"
                )
            started = time.perf_counter()
            self._load(device)
            self.device = device
        # One tiny generation, counted in the load: the first forward passes pay for memory
        # the KV cache and kernels touch for the first time (seconds on a busy CPU), and that
        # belongs to loading, not to the first user's time to first token.
        try:
            warm_up = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
            self.complete("Hello", warm_up).completion()
        except BaseException:
            self.unload()
            raise
        self.load_seconds = time.perf_counter() - started

    def unload(self) -> None:
        """Cancel what is running and free the model's memory."""
        with self._state_lock:
            if self.device is None:
                return
            for request in list(self._active.values()):
                request.cancel()
            self._unload()
            for request in list(self._active.values()):
                request.release()
            self._active.clear()
            self.device = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    # -- requests -------------------------------------------------------------------------
    def chat(self, messages: Sequence[Message], params: SamplingParams) -> GenerationStream:
        """Start a chat completion: ``messages`` go through the model's chat template."""
        return self.submit(self.chat_ids(messages), params)

    def complete(self, prompt: str, params: SamplingParams) -> GenerationStream:
        """Start a plain completion of ``prompt``."""
        return self.submit(self.prompt_ids(prompt), params)

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """``messages`` checked, then through the chat template: the prompt :meth:`chat`
        submits (apart, so that a caller can prepare several before submitting any)."""
        check_messages(messages)
        return self.encode_chat(messages)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``prompt`` checked and tokenized: what :meth:`complete` submits."""
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return self.encode_text(prompt)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Start generating after ``prompt_ids``."""
        if not self.loaded:
            raise EngineError(f"{self.spec.name} is not loaded: call load(device) first")
        params.check()
        context = self.context_length
        room = context - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(
                f"the prompt is {len(prompt_ids)} tokens; {self.spec.name} reads at most "
                f"{context} tokens: shorten it",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_tokens is not None and params.max_tokens > room:
            raise InvalidRequest(
                f"max_tokens is {params.max_tokens} but the prompt ({len(prompt_ids)} tokens) "
                f"leaves room for {room} of {self.spec.name}'s {context}: lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        request = ActiveRequest(
            request_id=f"{self.kind}-{next(_ids)}",
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=params.max_tokens or room,
            eos_ids=self.eos_token_ids,
            decode=self.decode,
        )
        with self._state_lock:
            if not self.loaded:
                raise EngineError(f"{self.spec.name} was unloaded")
            self._active[request.id] = request
            self._requests_total += 1
        try:
            self._start(request)
        except BaseException:
            self._forget(request)
            raise
        return GenerationStream(request)

    def _forget(self, request: ActiveRequest) -> None:
        """Called by engines once a request is released: drop it from the active set."""
        request.release()
        with self._state_lock:
            if self._active.pop(request.id, None) is not None:
                self._generated_total += request.generated

    def stats(self) -> EngineStats:
        with self._state_lock:
            active = list(self._active.values())
            return EngineStats(
                loaded=self.loaded,
                device=self.device,
                active_requests=len(active),
                pending_tokens=sum(r.remaining_tokens for r in active),
                requests_total=self._requests_total,
                generated_tokens_total=self._generated_total + sum(r.generated for r in active),
            )

    # -- what each engine implements ------------------------------------------------------
    @property
    def context_length(self) -> int:
        """The most tokens (prompt + completion) one request may hold."""
        return self._context

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a generation."""
        return self._eos

    @abstractmethod
    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` through the chat template, ready for the reply."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Token ids of a plain prompt."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, without special tokens."""

    @abstractmethod
    def _load(self, device: str) -> None: ...

    @abstractmethod
    def _unload(self) -> None: ...

    @abstractmethod
    def _start(self, request: ActiveRequest) -> None:
        """Queue ``request``; tokens go to ``request.emit``; call ``self._forget`` when done."""


def check_messages(messages: Sequence[Message]) -> None:
    """Raise InvalidRequest unless ``messages`` is a non-empty list of role/content pairs."""
    if not messages:
        raise InvalidRequest("messages must not be empty", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role is {role!r}; use one of {', '.join(CHAT_ROLES)}",
                param=f"messages[{i}].role",
            )
        if not isinstance(message.get("content"), str):
            raise InvalidRequest(
                f"messages[{i}].content must be text", param=f"messages[{i}].content"
            )


def template_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Messages as chat templates expect them (``developer`` is ``system`` to older models)."""
    return [
        {"role": "system" if m["role"] == "developer" else str(m["role"]), "content": m["content"]}
        for m in messages
    ]


def render_chat(
    model: str, messages: Sequence[Message], render: Callable[[list[dict[str, str]]], T]
) -> T:
    """``render`` (an engine's chat template) applied to ``messages``; what the template
    refuses is the request's fault: a 400 on ``messages``."""
    turns = template_messages(messages)
    try:
        return render(turns)
    except Exception as exc:  # jinja raises its own errors for what a template refuses
        raise InvalidRequest(
            f"the chat template of {model} refused the messages: {exc}", param="messages"
        ) from None
