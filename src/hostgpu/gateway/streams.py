"""Relay model servers' token streams to the clients waiting on this gateway.

A model server sends :class:`~hostgpu.inference.jobs.StreamEvent` batches (on its channel,
or in HTTP requests); the :class:`StreamHub` puts each event in its job's :class:`Relay`, and
the client's :class:`RemoteStream` reads them. A ``RemoteStream`` behaves like an engine's
``GenerationStream`` (``async for`` deltas, ``acompletion()``, ``cancel()``), so the gateway
formats responses and SSE with the same code as the single-engine server.

Gateways that share a PostgreSQL database: a server may post to another gateway than the one
its request's client waits on. That gateway forwards the events it has no reader for through
the store's broadcast (LISTEN/NOTIFY, :func:`wire_pieces` keeps each under NOTIFY's limit),
and the reader's gateway puts them in the relay (:meth:`StreamHub.heard`). A client that
hangs up cancels its job in the store; the forwarding gateway hears that job finish, checks
its forwarded jobs again and tells the server to stop.

Which server has which model loaded (for ``GET /v1/models`` and for sending a request to the
server that has its model warm) is the fleet's, not one gateway's: a gateway tells the others
when a server that streams to it changes (:class:`ServerEngines`, broadcast), and again every few
seconds for gateways that started since.

What the relay does not see, the store has: every inference job's result is reported like any
job's. When a stream goes quiet the reader looks at the job, and a job that finished without
its stream's end reaching this gateway (a lost broadcast, or a server that died and the job
ran again elsewhere) is answered from its stored result. A job re-run after a lost lease
streams again from the start; the reader skips the text it already sent (exact with greedy
decoding; a sampled re-run continues from the new attempt's text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from hostgpu.errors import HostGPUError, NotFound
from hostgpu.gateway.notify import LeaseWaiter, Preference, Runnable
from hostgpu.gateway.threads import run
from hostgpu.inference.engines.base import Completion, StreamDelta, Usage
from hostgpu.inference.errors import EngineError, InferenceError, InvalidRequest, ModelNotFound
from hostgpu.inference.jobs import (
    INFERENCE_FUNCTION,
    EngineState,
    GenerateResult,
    StreamEvent,
    served_models,
)
from hostgpu.jobs import Job, JobState, Lease
from hostgpu.store import Store
from hostgpu.store.interface import MAX_BROADCAST_BYTES

log = logging.getLogger("hostgpu.gateway")
M = TypeVar("M", bound=BaseModel)

#: How long a stream may be silent before its reader looks at the job in the store.
QUIET_S = 1.0
#: Relays nobody reads are dropped after this long (events for jobs of other gateways).
ORPHAN_S = 60.0
#: Characters of text per forwarded piece: JSON writes a character in at most 6 bytes.
PIECE_CHARS = 1000
#: Forwarded events for a job with no reader here yet are kept this long (its request may
#: still be resuming after the commit), for at most this many jobs at once.
EARLY_S = 5.0
EARLY_MAX_JOBS = 10_000
#: How long a left server's time is kept, against older word of it arriving late.
TOMBSTONE_S = 60.0
#: A server unheard of for this long (its last contact with any gateway) is gone: idle
#: workers touch the store only every few long polls, so this is well above their TTL.
GONE_AFTER_S = 120.0


class ServerEngines(BaseModel):
    """A model server's engines, as one gateway tells the others (no engines: it left)."""

    worker: str = Field(pattern=r"^[0-9a-f]{1,32}$")
    name: str = Field(max_length=200)
    capacity: int = Field(ge=0, le=100_000)
    engines: list[EngineState] = Field(max_length=64)
    #: When the server said it (UNIX time): a server that moved to another gateway is
    #: described by both for a while, and the newer word wins.
    said_at: float = 0.0


def wire_pieces(event: StreamEvent) -> list[str]:
    """``event`` as broadcast payloads, each under NOTIFY's limit: long text in several
    pieces (its token count and the end ride on the last one). A final result travels
    without its text, which the reader has put together from the pieces."""
    texts = [event.text[i : i + PIECE_CHARS] for i in range(0, len(event.text), PIECE_CHARS)]
    texts = texts or [""]
    result = event.result.model_copy(update={"text": ""}) if event.result else None
    pieces = []
    at = event.offset
    for n, text in enumerate(texts):
        last = n == len(texts) - 1
        piece = event.model_copy(
            update={
                "text": text,
                # Also what keeps two pieces of equal text distinct: PostgreSQL delivers
                # identical payloads of one transaction once.
                "offset": at,
                "tokens": event.tokens if last else 0,
                "result": result if last else None,
                "error": event.error if last else None,
            }
        )
        at = None if at is None else at + len(text)
        wire = piece.model_dump_json(exclude_none=True)
        if len(wire.encode()) > MAX_BROADCAST_BYTES:  # only an error body can be this long
            message = str((event.error or {}).get("error", {}).get("message", ""))[:500]
            short = {"error": {"message": message or "generation failed", "type": "server_error"}}
            wire = piece.model_copy(update={"error": short}).model_dump_json(exclude_none=True)
        pieces.append(wire)
    return pieces


class Relay:
    """One job's events on this gateway."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.cancelled = False
        self.reading = False
        self.created = time.monotonic()
        #: The attempt whose text is relayed, and the ones it replaced: a server that lost its
        #: lease but still sends (it has not heard yet) must not interleave its text.
        self.lease: str | None = None
        self.retired: set[str] = set()


class StreamHub:
    def __init__(self) -> None:
        self._relays: dict[str, Relay] = {}
        #: Job id → worker id → whether the store says that worker holds the job: a server
        #: streams only its jobs. By job, so a recheck drops a job's entries in one step.
        self._verified: dict[str, dict[str, bool]] = {}
        #: Worker id → its engines, as it last said, and its name.
        self.engines: dict[str, list[EngineState]] = {}
        self.names: dict[str, str] = {}
        #: Worker id → how many streams it runs at once.
        self.capacity: dict[str, int] = {}
        #: Worker id → when what this gateway knows of its engines was said (UNIX time).
        self._said_at: dict[str, float] = {}
        #: Servers that post to this gateway (and have not since posted to another).
        self._local: set[str] = set()
        #: Jobs whose events this gateway forwards to another one (their reader is there).
        self.forwarded: set[str] = set()
        #: Forwarded events that came before their reader's relay: job id → (when, events).
        self._early: dict[str, tuple[float, list[StreamEvent]]] = {}
        self._early_swept = 0.0

    def local(self, job_id: str) -> bool:
        """Whether the job's reader is on this gateway (or was: a hang-up is kept)."""
        return job_id in self._relays

    def heard(self, payload: str) -> None:
        """An event another gateway forwarded: for this gateway's reader, if it has one."""
        event = _parse(StreamEvent, payload, "forwarded stream event")
        if event is None:
            return
        if event.job_id in self._relays:
            self.publish(event)
            return
        self._stash(event)

    def _stash(self, event: StreamEvent) -> None:
        """An event with no reader here yet, perhaps ours: its job was stored and its request
        has not resumed to open the relay. Kept briefly, so the stream's start is not lost.
        (Jobs whose reader is on a third gateway land here too: dropped after EARLY_S.)"""
        now = time.monotonic()
        if now - self._early_swept > 1.0 or len(self._early) >= EARLY_MAX_JOBS:
            self._early = {j: e for j, e in self._early.items() if now - e[0] < EARLY_S}
            while len(self._early) >= EARLY_MAX_JOBS:
                del self._early[next(iter(self._early))]
            self._early_swept = now
        self._early.setdefault(event.job_id, (now, []))[1].append(event)

    def forward(self, event: StreamEvent) -> list[str]:
        """The pieces to broadcast for an event whose reader is elsewhere (or not set up
        yet here: it is kept too, as this gateway's own broadcast does not come back)."""
        self._stash(event)
        if len(self.forwarded) > 100_000:
            self.forwarded.clear()
        if event.result is None and event.error is None:
            self.forwarded.add(event.job_id)
        else:  # its last event: nothing more to check for it
            self.forwarded.discard(event.job_id)
            self._verified.pop(event.job_id, None)
        return wire_pieces(event)

    def recheck(self) -> None:
        """A job finished somewhere (perhaps cancelled by its reader's gateway): check the
        forwarded ones against the store again at their next event."""
        for job_id in self.forwarded:
            self._verified.pop(job_id, None)

    def relay(self, job_id: str) -> Relay:
        relay = self._relays.get(job_id)
        if relay is None:
            self._sweep()
            relay = self._relays[job_id] = Relay()
            heard_at, early = self._early.pop(job_id, (0.0, []))
            if time.monotonic() - heard_at < EARLY_S:
                for event in early:
                    self.publish(event)
        return relay

    def close(self, job_id: str) -> None:
        self._relays.pop(job_id, None)
        self._verified.pop(job_id, None)

    def verified(self, job_id: str, worker_id: str) -> bool | None:
        return self._verified.get(job_id, {}).get(worker_id)

    def leased(self, worker_id: str, leases: list[Lease]) -> None:
        """The worker holds these leases now: it may stream their inference jobs' text."""
        for lease in leases:
            if lease.function == INFERENCE_FUNCTION:
                self.verify(lease.job_id, worker_id, True)

    def verify(self, job_id: str, worker_id: str, ok: bool) -> None:
        if len(self._verified) > 100_000:
            self._verified.clear()
        self._verified.setdefault(job_id, {})[worker_id] = ok

    def forget(self, worker_id: str, said_at: float | None = None) -> None:
        """A server left: its engines no longer count. Its time stays (a tombstone), so older
        word of it from another gateway, still on its way, does not bring it back."""
        for table in (self.engines, self.names, self.capacity):
            table.pop(worker_id, None)
        self._said_at[worker_id] = max(self._said_at.get(worker_id, 0.0), said_at or time.time())
        self._local.discard(worker_id)

    def prune(self, gone: set[str]) -> None:
        """Forget the servers the store says are gone (crashed without deregistering): they
        must not hold requests back waiting for them. Old tombstones go too."""
        for worker_id in gone & set(self.engines):
            self.forget(worker_id)
        cutoff = time.time() - TOMBSTONE_S
        for worker_id in [
            w for w, at in self._said_at.items() if w not in self.engines and at < cutoff
        ]:
            del self._said_at[worker_id]

    def note_engines(
        self, worker_id: str, name: str, capacity: int, engines: list[EngineState]
    ) -> bool:
        """A server that streams here said its engines: True when that changes what the other
        gateways were told (then they are told again)."""
        changed = (
            self.engines.get(worker_id) != engines
            or self.names.get(worker_id) != name
            or self.capacity.get(worker_id) != capacity
        )
        self.engines[worker_id] = engines
        self.names[worker_id] = name
        self.capacity[worker_id] = capacity
        self._said_at[worker_id] = time.time()
        self._local.add(worker_id)
        return changed

    def told(self, worker_id: str) -> str:
        """What to broadcast of a server: its engines, or that it left."""
        return ServerEngines(
            worker=worker_id,
            name=self.names.get(worker_id, ""),
            capacity=self.capacity.get(worker_id, 0),
            engines=self.engines.get(worker_id, []),
            said_at=self._said_at.get(worker_id, time.time()),
        ).model_dump_json()

    def local_servers(self) -> list[str]:
        """The servers this gateway describes to the others (they post here)."""
        return sorted(self._local)

    def heard_engines(self, payload: str) -> None:
        """Another gateway described one of its servers (on the event loop)."""
        said = _parse(ServerEngines, payload, "engines broadcast")
        if said is None:
            return
        if said.said_at <= self._said_at.get(said.worker, 0.0):
            return  # older than what this gateway knows (perhaps from the server itself)
        if not said.engines:
            self.forget(said.worker, said.said_at)
            return
        self.engines[said.worker] = said.engines
        self.names[said.worker] = said.name
        self.capacity[said.worker] = said.capacity
        self._said_at[said.worker] = said.said_at
        self._local.discard(said.worker)  # it sends to another gateway now

    def preference(self, job: Runnable, idle: list[LeaseWaiter]) -> Preference | None:
        """For an inference job: offer it first to servers that have its model loaded, the
        least busy first. When none of them waits for work but one has room (it is between
        two long polls, reporting its last answer), hold the job a moment for it rather than
        wake a server that would have to load the model."""
        models = served_models(job.requirements.labels)
        if job.function != INFERENCE_FUNCTION or not models:
            return None
        model = models[0]

        def warm(worker_id: str) -> EngineState | None:
            for engine in self.engines.get(worker_id, []):
                if engine.model == model and engine.loaded:
                    return engine
            return None

        def rank(waiter: LeaseWaiter) -> tuple[int, int]:
            engine = warm(waiter.worker_id)
            return (0, engine.active) if engine is not None else (1, 0)

        waiting = {w.worker_id for w in idle}
        hold = not any(warm(w) for w in waiting) and any(
            (engine := warm(worker_id)) is not None
            and engine.active < self.capacity.get(worker_id, 1)
            for worker_id in self.engines
            if worker_id not in waiting and worker_id in self.names
        )
        return Preference(rank, hold)

    def publish(self, event: StreamEvent) -> bool:
        """Hand an event to its reader; True when nobody wants the job's text any more."""
        relay = self.relay(event.job_id)
        if relay.cancelled or event.lease_token in relay.retired:
            return True
        if event.lease_token != relay.lease:
            if relay.lease is not None:
                relay.retired.add(relay.lease)
            relay.lease = event.lease_token
        relay.queue.put_nowait(event)
        return False

    def _sweep(self) -> None:
        now = time.monotonic()
        for job_id in [
            j for j, r in self._relays.items() if not r.reading and now - r.created > ORPHAN_S
        ]:
            del self._relays[job_id]


def _parse(model: type[M], payload: str, what: str) -> M | None:
    """A message from another gateway, or None (logged) when it is not one."""
    try:
        return model.model_validate_json(payload)
    except ValueError:
        log.warning("ignored a malformed %s", what)
        return None


async def tell_engines(store: Store, hub: StreamHub, worker_ids: list[str]) -> None:
    """Tell the other gateways on this database what these servers have loaded. Best effort:
    they are told again every few seconds (the gateway's housekeeping)."""
    payloads = []
    for payload in map(hub.told, worker_ids):
        if len(payload.encode()) > MAX_BROADCAST_BYTES:  # 64 engines of very long names
            log.warning("a server's engines are too long to tell the other gateways")
        else:
            payloads.append(payload)
    try:
        await run(store.broadcast, "engines", payloads)
    except HostGPUError:  # the database is away: the next change or refresh tells them
        log.warning("could not tell the other gateways a server's engines", exc_info=True)


def gone_servers(store: Store, worker_ids: list[str]) -> set[str]:
    """Which of these servers the store says are gone: deregistered, or silent for
    :data:`GONE_AFTER_S` (in a thread: it reads the store)."""
    gone = set()
    now = time.time()
    for worker_id in worker_ids:
        try:
            worker = store.get_worker(worker_id)
        except NotFound:
            gone.add(worker_id)
            continue
        if worker.state == "stopped" or now - worker.last_seen > GONE_AFTER_S:
            gone.add(worker_id)
    return gone


def error_from_body(body: dict[str, Any]) -> InferenceError:
    """The exception an OpenAI error body stands for (the engine's error on the server)."""
    inner = body.get("error")
    error: dict[str, Any] = inner if isinstance(inner, dict) else body
    message = str(error.get("message") or "generation failed")
    kind: type[InferenceError] = EngineError
    if error.get("code") == "model_not_found":
        kind = ModelNotFound
    elif error.get("type") == "invalid_request_error":
        kind = InvalidRequest
    return kind(message, param=error.get("param"), code=error.get("code"))


class RemoteStream:
    """An inference job's text as it arrives: the interface of an engine's stream."""

    def __init__(
        self,
        hub: StreamHub,
        job_id: str,
        fetch_job: Callable[[], Awaitable[Job]],
        cancel_job: Callable[[], Awaitable[Any]],
    ) -> None:
        self.hub = hub
        self.job_id = job_id
        self.relay = hub.relay(job_id)
        self.relay.reading = True
        self._fetch_job = fetch_job
        self._cancel_job = cancel_job
        self._completion: Completion | None = None
        self._error: InferenceError | None = None
        self._text: list[str] = []
        self._sent = 0  # characters delivered to the reader
        self._started = time.perf_counter()
        self._first_at: float | None = None
        self._closed = False
        self._cancel_task: asyncio.Task[Any] | None = None
        #: The device the job runs on, once its first event said.
        self.device: str | None = None
        #: The request's place in its token's concurrency limit (freed with this stream).
        self.slot: object | None = None
        # A stream nobody ever read (the client left before its response started) still
        # stops its job: its server is told at its next event here, and the job is
        # cancelled in the store for a server that sends its events to another gateway.
        self._abandon = weakref.finalize(self, _abandoned, self.relay, cancel_job, _loop())
        self._abandon.atexit = False  # a process that is exiting cancels nothing

    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        lease: str | None = None
        attempt_chars = 0
        # An event of this attempt went missing: the text goes on from an event that starts
        # at or before what was read (the server's catch-up after it lost its channel, or a
        # re-run); until then, or if none comes, the store has the rest.
        gap = False
        while not self.done:
            event: StreamEvent | None = None
            with contextlib.suppress(TimeoutError):
                wait = QUIET_S / 4 if gap else QUIET_S
                event = await asyncio.wait_for(self.relay.queue.get(), wait)
            if event is None:  # quiet, or a gap: does the store have the end?
                job = await self._fetch_job()
                if job.state.terminal:
                    delta = self._finish_from_job(job)
                    if delta is not None:
                        yield delta
                continue
            if event.lease_token != lease:  # a new attempt streams from its start
                lease, attempt_chars = event.lease_token, 0
            self.device = event.device or self.device
            if event.offset is not None and event.offset > attempt_chars:
                gap = True  # text before this event never arrived (a lost broadcast)
                continue
            gap = False
            if event.error is not None:
                self._fail(error_from_body(event.error))
                break
            # A repeated event: only what is new. Then skip what an earlier attempt delivered.
            repeated = 0 if event.offset is None else attempt_chars - event.offset
            fresh = event.text[repeated:]
            skip = max(0, min(len(fresh), self._sent - attempt_chars))
            attempt_chars += len(fresh)
            text = fresh[skip:]
            if text:
                yield self._deliver(text, event.tokens)
            if event.result is not None:
                self._complete(event.result, "".join(self._text))
        self._close()
        if self._error is not None:
            raise self._error

    def _deliver(self, text: str, tokens: int) -> StreamDelta:
        if self._first_at is None:
            self._first_at = time.perf_counter()
        self._text.append(text)
        self._sent += len(text)
        return StreamDelta(text, tokens)

    def _complete(self, result: GenerateResult, text: str) -> None:
        self.device = result.device or self.device
        self._completion = Completion(
            id=self.job_id,
            text=text,
            finish_reason="length" if result.finish_reason == "length" else "stop",
            usage=Usage(result.prompt_tokens, result.completion_tokens),
            time_to_first_token=(
                None if self._first_at is None else self._first_at - self._started
            ),
            duration=time.perf_counter() - self._started,
        )

    def _fail(self, error: InferenceError) -> None:
        self._error = error

    def _finish_from_job(self, job: Job) -> StreamDelta | None:
        """The job finished without its stream's end reaching this gateway: its stored
        result (or error) ends the stream."""
        if job.state is JobState.succeeded:
            result = GenerateResult.model_validate(job.result)
            rest = result.text[self._sent :]
            delta = self._deliver(rest, result.completion_tokens) if rest else None
            self._complete(result, result.text)
            return delta
        if job.state is JobState.cancelled:
            self._fail(EngineError("the request was cancelled", code="cancelled"))
        else:
            message = job.error.message if job.error else "generation failed"
            self._fail(EngineError(message))
        return None

    async def acompletion(self) -> Completion:
        async for _ in self:
            pass
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def cancel(self) -> bool:
        """The reader went away: stop the job (its server stops at its next event)."""
        if self.done:
            self._close()
            return False
        self.relay.cancelled = True  # first: a cancelled relay outlives its reader
        self._close()
        self._error = EngineError("cancelled", code="cancelled")
        # Cancelled in the store too: a job still queued must not run for nobody.
        self._cancel_task = asyncio.ensure_future(self._cancel_job())
        return True

    def _close(self) -> None:
        self._abandon.detach()
        if not self._closed:
            self._closed = True
            self.relay.reading = False
            if not self.relay.cancelled:
                self.hub.close(self.job_id)


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # made outside a request (tests)
        return None


def _abandoned(
    relay: Relay, cancel_job: Callable[[], Awaitable[Any]], loop: asyncio.AbstractEventLoop | None
) -> None:
    relay.cancelled = True
    if loop is not None and not loop.is_closed():  # it may run on any thread, or at shutdown
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_cancel_soon, cancel_job)


def _cancel_soon(cancel_job: Callable[[], Awaitable[Any]]) -> None:
    _orphans.add(task := asyncio.ensure_future(cancel_job()))
    task.add_done_callback(_orphans.discard)


#: Cancellations of abandoned streams in flight (the loop keeps only weak references).
_orphans: set[asyncio.Future[Any]] = set()


async def with_keepalive(
    lines: AsyncIterator[str], every: float, comment: str
) -> AsyncIterator[str]:
    """``lines``, with ``comment`` sent whenever nothing else was for ``every`` seconds (a
    request waiting in the queue keeps its connection, and its proxies, alive)."""
    iterator = aiter(lines)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield comment
                continue
            try:
                line = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield line
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
