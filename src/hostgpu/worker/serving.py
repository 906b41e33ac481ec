"""A model server's engines: run leased inference jobs on warm models, stream their text.

:class:`EnginePool` takes the place of the child pool in a worker that serves models
(``hostgpu serve``, ``hostgpu share``): the same lease loop, heartbeats, reports, drain and
stop drive it, so a model server keeps every promise a function worker keeps (a lost lease is
re-run elsewhere, a stop finishes in-flight work within the grace, then hands the rest back).

- Engines load on first use, on the worker's best device, and stay warm; one that served
  nothing for ``keep_alive`` seconds is unloaded (as Ollama's ``keep_alive``), and so is the
  least recently used idle one when a load would pass the memory budget.
- Each running job has a thread that reads its engine stream; requests on one model share the
  engine, which batches them. The jobs that one lease hands over start on their engine
  together (:meth:`EnginePool._admit`), so a burst of requests shares the engine's first step.
- :class:`Streamer` sends the text to the gateway as it comes, in batches (one message carries
  every event that arrived while the previous one was in flight), on the worker's channel or
  else in HTTP requests, and cancels the jobs the gateway says nobody reads any more.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from hostgpu.api import MAX_STREAM_EVENTS, StreamBatch
from hostgpu.client import Client
from hostgpu.errors import HostGPUError
from hostgpu.inference import openai_schema as oa
from hostgpu.inference.engines import Engine, GenerationStream, create_engine
from hostgpu.inference.errors import EngineError, InferenceError
from hostgpu.inference.jobs import (
    INFERENCE_FUNCTION,
    EngineState,
    GenerateRequest,
    GenerateResult,
    StreamEvent,
    function_options,
)
from hostgpu.inference.models import ModelSpec
from hostgpu.jobs import ErrorKind, JobError, Lease, Outcome, Payload
from hostgpu.worker.batches import batches
from hostgpu.worker.child import Ready

log = logging.getLogger("hostgpu.serve")
# transformers' batching logs every start and stop at INFO: keep the server's log to its own.
logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)

Key = tuple[str, str]  # (job id, lease token)
#: What the streamer sends: a job's stream event, or the engines' states.
Sendable = StreamEvent | list[EngineState]
#: A batch of stream events waits for the other decoding jobs' events of the same engine
#: step, at most a tenth of the time between steps and at most LINGER_MAX_S: a step yields a
#: token for each of its streams at once, and each reaches the streamer from its job's own
#: thread a moment apart. Sent in one request, no stream's token waits a round trip to the
#: gateway behind another's (measured at 8 streams on 2 cores: a step's tokens went out in
#: two or three requests, 3-12 ms apart). A lone stream never waits.
LINGER_MAX_S = 0.005
LINGER_SHARE = 0.1


#: A job started on its engine by the admission: its request and its stream.
_Opened = tuple[GenerateRequest, GenerationStream]


def _request(lease: Lease) -> GenerateRequest:
    payload = lease.payload if isinstance(lease.payload, Payload) else Payload()
    return GenerateRequest.model_validate(payload.kwargs.get("request"))


def _prompt_ids(engine: Engine, request: GenerateRequest) -> list[int]:
    if request.kind == "chat":
        return engine.chat_ids(request.messages or [])
    return engine.prompt_ids(request.prompt or "")


@dataclass
class _Running:
    lease: Lease
    model: str
    stream: GenerationStream | None = None
    #: Why it was stopped from here: "stop" hands the lease back, "cancel" reports it.
    stopped: str | None = None


class Streamer:
    """Sends stream events and engine states to the gateway from one thread, batched."""

    def __init__(self, client_factory: Callable[[], Client], on_cancel: Callable[[str], object]):
        self._client_factory = client_factory
        self._on_cancel = on_cancel
        self._queue: queue.Queue[Sendable | None] = queue.Queue()
        self.worker_id: str | None = None
        #: Sends a batch on the worker's channel (set by the agent) and returns that channel's
        #: number; None when it did not (no channel, one that is closing, a batch over its
        #: message limit): then HTTP.
        self.on_channel: Callable[[StreamBatch], int | None] = lambda batch: None
        #: Every streaming job's text so far, from its start (set by the engine pool).
        self.catch_up: Callable[[], list[StreamEvent]] = list
        self._via: int | None = None  # the channel the last batch went on (None: HTTP)
        self._thread = threading.Thread(target=self._run, name="hostgpu-streamer", daemon=True)
        self.sent_events = 0
        #: The jobs whose streams yield a token at each engine step now (set by the engine
        #: pool), and when the streamer last heard from each.
        self.decoding: Callable[[], set[str]] = set
        self._heard: dict[str, float] = {}
        self._step_s = 0.0  # the time between batches while jobs stream (moving average)
        self._last_batch = 0.0

    def start(self) -> None:
        self._thread.start()

    def send(self, event: StreamEvent) -> None:
        self._queue.put(event)

    def engines(self, states: list[EngineState]) -> None:
        self._queue.put(states)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = self._client_factory()
        try:
            sent: Iterator[list[Sendable]] = batches(self._queue)
            for items in sent:
                closed = self._gather(items)
                events = [i for i in items if isinstance(i, StreamEvent)]
                states = [i for i in items if isinstance(i, list)]
                self._post(client, events, states[-1] if states else None)
                if closed:
                    return
        finally:
            client.close()

    def _gather(self, items: list[Sendable]) -> bool:
        """Add to ``items`` the events of this engine step still on their way: those of the
        decoding jobs not heard from in the last half step, awaited within the linger (see
        :data:`LINGER_MAX_S`). True when the close signal came meanwhile.

        A job heard from within the last half step has sent this step's token already: a
        step's events can straddle a request to the gateway, and waiting for that job's next
        one held the rest a whole linger (measured at 8 long prompts on 2 cores: first tokens
        waited 6-10 ms behind a stream whose token had gone in the batch before)."""
        now = time.monotonic()
        if self._last_batch:
            self._step_s += 0.2 * (min(now - self._last_batch, 1.0) - self._step_s)
        self._last_batch = now
        deadline = now + min(LINGER_MAX_S, LINGER_SHARE * self._step_s)
        decoding = self.decoding()
        self._heard = heard = {job: at for job, at in self._heard.items() if job in decoding}
        for event in items:
            if isinstance(event, StreamEvent):
                heard[event.job_id] = now
        recent = now - self._step_s / 2
        awaited = {job for job in decoding if heard.get(job, -1.0) < recent}
        while awaited:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if item is None:
                return True
            items.append(item)
            if isinstance(item, StreamEvent):
                heard[item.job_id] = time.monotonic()
                awaited.discard(item.job_id)
        return False

    def _post(
        self, client: Client, events: list[StreamEvent], states: list[EngineState] | None
    ) -> None:
        if self.worker_id is None:
            return
        while len(events) > MAX_STREAM_EVENTS:  # a gateway that was slow to answer
            self._post(client, events[:MAX_STREAM_EVENTS], None)
            events = events[MAX_STREAM_EVENTS:]
        batch = StreamBatch(events=events, engines=states)
        via = self.on_channel(batch)  # the jobs to stop come back on the channel
        if via is None:
            try:
                cancelled = client.stream(self.worker_id, batch)
            except HostGPUError as exc:
                # The text is lost for live readers, not for the job: its result goes in
                # the report, and the gateway answers from that.
                log.warning("could not send %d stream event(s): %s", len(events), exc)
                return
            for job_id in cancelled:
                self._on_cancel(job_id)
        self.sent_events += len(events)
        left, self._via = self._via is not None and via != self._via, via
        # The batches sent last on that channel may be lost with it (the gateway closing it
        # unread): readers would see a gap and wait for the stored result. Each stream's
        # text from its start mends the gap; a reader takes only what it lacks.
        if left and (whole := self.catch_up()):
            self._post(client, whole, None)


class EnginePool:
    """Runs leased inference jobs on warm engines (the child pool's interface)."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        device: str,
        on_result: Callable[[Outcome], None],
        streamer: Streamer,
        *,
        concurrency: int = 4,
        keep_alive: float = 300.0,
        memory_budget: int | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.specs = dict(specs)
        self.device = device
        self.concurrency = concurrency
        self.keep_alive = keep_alive
        self.memory_budget = memory_budget
        self.timeout = timeout
        self._on_result = on_result
        self.streamer = streamer
        streamer.decoding = self.decoding
        streamer.catch_up = self.catch_up
        self._lock = threading.Condition()
        self._engines: dict[str, Engine] = {}
        self._load_locks = {name: threading.Lock() for name in self.specs}
        self._last_used: dict[str, float] = {}
        self._running: dict[Key, _Running] = {}
        self._accepting = True
        self._stopping = threading.Event()  # stop() began: requests waiting for memory give up
        self._closed = threading.Event()
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="hostgpu-serve")
        self._admissions: queue.Queue[list[Lease] | None] = queue.Queue()
        self._admitter = threading.Thread(target=self._admit, name="hostgpu-admit", daemon=True)
        self._janitor = threading.Thread(target=self._unload_idle, name="hostgpu-keepalive")
        self._janitor.daemon = True
        self.ready: Ready | None = None
        #: For status lines: requests finished, tokens generated.
        self.served = 0
        self.tokens = 0

    # -- the child pool's interface -----------------------------------------------------------
    def start(self) -> None:
        if self.ready is None:
            options = function_options(self.timeout).model_dump(mode="json")
            self.ready = Ready(os.getpid(), {}, {INFERENCE_FUNCTION: options})
            self.streamer.start()
            self._admitter.start()
            self._janitor.start()

    def wait_ready(self, timeout: float) -> Ready | None:
        return self.ready

    def submit(self, task: Lease) -> None:
        self.submit_all([task])

    def submit_all(self, tasks: Sequence[Lease]) -> None:
        """Start ``tasks`` (the jobs of one lease) on their engines together."""
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the engine pool is stopping and accepts no more tasks")
            for task in tasks:
                self._running[(task.job_id, task.lease_token)] = _Running(task, model="")
        self._admissions.put(list(tasks))

    def free_slots(self) -> int:
        with self._lock:
            return 0 if not self._accepting else max(0, self.concurrency - len(self._running))

    def executing(self) -> set[Key]:
        with self._lock:
            return set(self._running)

    def running(self) -> list[Lease]:
        with self._lock:
            return [r.lease for r in self._running.values()]

    def decoding(self) -> set[str]:
        """The jobs that yield a token at each step of their engine now: those past their
        first token and not finished. One still in its prefill, or waiting for an engine that
        serves one request at a time, sends nothing yet: a batch that waited for it would hold
        the others' tokens for the whole linger (measured at 8 long prompts on 2 cores: each
        first token waited 4.8 ms, the linger's most, for seven streams still in prefill)."""
        with self._lock:
            return {
                key[0]
                for key, r in self._running.items()
                if r.stream is not None and r.stream.decoding
            }

    def catch_up(self) -> list[StreamEvent]:
        """Each streaming job's text so far, as one event from its start (offset 0)."""
        with self._lock:
            streams = [(key, r.stream) for key, r in self._running.items() if r.stream]
        events = []
        for (job_id, lease_token), stream in streams:
            text = stream.text()
            if not text:
                continue
            try:
                event = StreamEvent(
                    job_id=job_id, lease_token=lease_token, text=text, offset=0, device=self.device
                )
            except ValidationError:  # over an event's size: its reader takes the stored result
                continue
            events.append(event)
        return events

    def cancel(self, job_id: str, lease_token: str | None = None) -> bool:
        return self._stop_jobs(
            lambda key: key[0] == job_id and lease_token in (None, key[1]), "cancel"
        )

    def wait_idle(self, timeout: float | None) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._running, timeout)

    def stop(self, *, cold: bool = False, grace: float = 30.0) -> list[Lease]:
        """Accept nothing more; let running generations finish for ``grace`` seconds (none
        when cold), then stop the rest and return their leases; unload every engine."""
        with self._lock:
            self._accepting = False
            if not cold:
                self._lock.wait_for(lambda: not self._running, max(grace, 0.0))
            unfinished = [r.lease for r in self._running.values()]
        self._stopping.set()
        self._stop_jobs(lambda key: True, "stop")
        self._admissions.put(None)
        if self._admitter.is_alive():
            self._admitter.join()  # every admitted job has its thread before the executor closes
        self._executor.shutdown(wait=True)
        self._closed.set()
        for name in list(self._engines):
            self._unload(name)
        self.streamer.close()
        return unfinished

    # -- engines ------------------------------------------------------------------------------
    def states(self) -> list[EngineState]:
        with self._lock:
            active: dict[str, int] = {}
            for r in self._running.values():
                active[r.model] = active.get(r.model, 0) + 1
            return [
                EngineState(
                    model=name,
                    loaded=name in self._engines,
                    device=self.device if name in self._engines else None,
                    active=active.get(name, 0),
                )
                for name in sorted(self.specs)
            ]

    def loaded(self) -> list[str]:
        with self._lock:
            return sorted(self._engines)

    def _engine(self, name: str) -> Engine:
        with self._load_locks[name]:
            with self._lock:
                engine = self._engines.get(name)
            if engine is not None:
                return engine
            self._make_room(name)
            engine = create_engine(self.specs[name])
            started = time.monotonic()
            engine.load(self.device)
            log.info("loaded %s on %s in %.1f s", name, self.device, time.monotonic() - started)
            with self._lock:
                self._engines[name] = engine
                self._last_used[name] = time.monotonic()
        self.streamer.engines(self.states())
        return engine

    def _make_room(self, name: str) -> None:
        """Unload idle engines, least recently used first, until ``name`` fits the budget;
        wait for busy ones to go idle (a request waits rather than overcommit memory)."""
        if self.memory_budget is None:
            return
        need = self.specs[name].estimated_memory_bytes()

        def used() -> int:
            return sum(self.specs[n].estimated_memory_bytes() for n in self._engines)

        while True:
            with self._lock:
                if used() + need <= self.memory_budget:
                    return
                busy = self._busy_locked()
                idle = sorted(
                    (n for n in self._engines if n not in busy), key=self._last_used.__getitem__
                )
            if idle:
                self._unload(idle[0], if_idle=True)
                continue
            if self._stopping.wait(0.2):
                raise EngineError("the model server is stopping")

    def _busy_locked(self) -> set[str]:
        """The models a job uses, from the moment it names its model (the admission may be
        about to submit it to that engine)."""
        return {r.model for r in self._running.values() if r.model}

    def _unload(self, name: str, *, if_idle: bool = False) -> None:
        with self._lock:
            if if_idle and name in self._busy_locked():  # a job came since it was chosen
                return
            engine = self._engines.pop(name, None)
        if engine is not None:
            engine.unload()
            log.info("unloaded %s", name)
            if not self._closed.is_set():
                self.streamer.engines(self.states())

    def _unload_idle(self) -> None:
        while not self._closed.wait(1.0):
            now = time.monotonic()
            with self._lock:
                busy = self._busy_locked()
                stale = [
                    n
                    for n in self._engines
                    if n not in busy and now - self._last_used.get(n, now) > self.keep_alive
                ]
            for name in stale:
                self._unload(name, if_idle=True)

    # -- admission ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Start the jobs that arrive together on their engines together, then give each its
        thread. Measured on 2 cores: eight jobs started from eight threads at once made the
        engine's first step with one of them in 3 of 5 tries (the other seven waited a whole
        prefill, about 570 ms); started from one thread, all eight made it every time."""
        for handed in batches(self._admissions):
            batch = [lease for leases in handed for lease in leases]
            opened: dict[Key, _Opened] = {}
            try:
                self._open_together(batch, opened)
            except Exception:  # each job is guarded; still, this thread must not die
                log.exception("starting %d inference jobs together failed", len(batch))
            for lease in batch:
                key = (lease.job_id, lease.lease_token)
                self._executor.submit(self._serve, lease, opened.get(key))

    def _open_together(self, batch: list[Lease], opened: dict[Key, _Opened]) -> None:
        """Streams, into ``opened``, for the jobs of ``batch`` whose engine is loaded: their
        prompts tokenized, then submitted together. A job left out (its model must load, its
        request is bad, its engine just unloaded) opens on its own thread, which meets and
        reports any error itself.

        An engine's jobs tokenized so far go at once when their prompts fill one step of its
        batching (:attr:`Engine.step_tokens`): that step is full whatever comes after them,
        and they would only wait for the tokenizer (13 ms for eight prompts of 1,000 tokens
        on the 2-core test machine; on a GPU, a good part of their prefill)."""
        prepared: list[tuple[Key, GenerateRequest, Engine, list[int]]] = []
        for lease in batch:
            key = (lease.job_id, lease.lease_token)
            try:
                request = _request(lease)
                with self._lock:
                    engine = self._engines.get(request.model)
                    running = self._running.get(key)
                    if engine is None or running is None or running.stopped:
                        continue
                    running.model = request.model  # busy: the keep-alive leaves it loaded
                ids = _prompt_ids(engine, request)
            except Exception:
                continue
            prepared.append((key, request, engine, ids))
            mine = [p for p in prepared if p[2] is engine]
            step = engine.step_tokens
            if step is not None and sum(len(p[3]) for p in mine) >= step:  # this engine's only
                self._submit_prepared(mine, opened)
                prepared = [p for p in prepared if p[2] is not engine]
        self._submit_prepared(prepared, opened)

    def _submit_prepared(
        self,
        prepared: list[tuple[Key, GenerateRequest, Engine, list[int]]],
        opened: dict[Key, _Opened],
    ) -> None:
        for key, request, engine, ids in prepared:
            try:
                stream = engine.submit(ids, request.sampling)
            except Exception:
                continue
            opened[key] = (request, stream)
            with self._lock:
                running = self._running.get(key)
                if running is not None:
                    running.stream = stream  # a cancel from now on reaches the engine
                stopped = running is None or running.stopped
            if stopped:
                with contextlib.suppress(Exception):
                    stream.cancel()

    # -- one job ------------------------------------------------------------------------------
    def _stop_jobs(self, which: Callable[[Key], bool], why: str) -> bool:
        with self._lock:
            hits = [r for key, r in self._running.items() if which(key)]
            for r in hits:
                r.stopped = r.stopped or why
        for r in hits:
            if r.stream is not None:
                r.stream.cancel()
        return bool(hits)

    def _serve(self, lease: Lease, opened: _Opened | None = None) -> None:
        key = (lease.job_id, lease.lease_token)
        started = time.monotonic()
        outcome: Outcome | None
        try:
            outcome = self._generate(lease, started, opened)
        except Exception as exc:  # the job fails; the server carries on
            log.exception("inference job %s failed", lease.job_id)
            outcome = self._failed(lease, exc, started)
        with self._lock:
            running = self._running.pop(key, None)
            if running is not None and running.model:
                self._last_used[running.model] = time.monotonic()
            self._lock.notify_all()
        if running is not None and running.stopped == "stop":
            return  # handed back by stop(): the agent releases it
        if outcome is not None:
            self._on_result(outcome)
        self.streamer.engines(self.states())

    def _generate(self, lease: Lease, started: float, opened: _Opened | None) -> Outcome | None:
        key = (lease.job_id, lease.lease_token)
        if opened is not None:
            request, stream = opened
        else:
            request = _request(lease)
            if request.model not in self.specs:
                raise EngineError(f"model {request.model!r} is not served here")
            with self._lock:
                running = self._running[key]
                running.model = request.model
                if running.stopped == "stop":
                    return None  # handed back: no model loads for it while the server stops
            engine = self._engine(request.model)
            stream = engine.submit(_prompt_ids(engine, request), request.sampling)
        with self._lock:
            running = self._running[key]
            running.stream = stream
            stopped = running.stopped
        if stopped:
            stream.cancel()
        deadline = started + lease.timeout_s
        event: dict[str, Any] = {"job_id": lease.job_id, "lease_token": lease.lease_token}
        timed_out = False
        offset = 0  # characters of this attempt's text sent before the next event
        while True:
            try:
                wait = None if timed_out else max(0.0, deadline - time.monotonic())
                delta = stream.next(timeout=wait)
            except TimeoutError:
                timed_out = True
                stream.cancel()
                continue
            if delta is None:
                break
            self.streamer.send(
                StreamEvent(
                    **event,
                    text=delta.text,
                    tokens=delta.tokens,
                    device=self.device,
                    offset=offset,
                )
            )
            offset += len(delta.text)
        event["offset"] = offset  # the end (result or error) comes after all the text
        completion = stream.completion()
        self.tokens += completion.usage.completion_tokens
        if completion.finish_reason == "cancelled":
            why: ErrorKind = "timeout" if timed_out else "cancelled"
            message = (
                f"generation passed the job's timeout of {lease.timeout_s:g} s"
                if timed_out
                else "generation cancelled (the client went away or the job was cancelled)"
            )
            error = JobError(type="Cancelled", message=message, kind=why)
            self.streamer.send(
                StreamEvent(**event, error={"error": {"message": message, "type": why}})
            )
            return Outcome(
                job_id=lease.job_id,
                lease_token=lease.lease_token,
                status="failed",
                error=error,
                retryable=False,
                device=self.device,
            )
        result = GenerateResult(
            text=completion.text,
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.usage.prompt_tokens,
            completion_tokens=completion.usage.completion_tokens,
            time_to_first_token=completion.time_to_first_token,
            duration=completion.duration,
            device=self.device,
        )
        self.streamer.send(StreamEvent(**event, result=result, device=self.device))
        self.served += 1
        return Outcome(
            job_id=lease.job_id,
            lease_token=lease.lease_token,
            status="succeeded",
            result=result.model_dump(mode="json"),
            device=self.device,
            timings={"run_s": time.monotonic() - started},
        )

    def _failed(self, lease: Lease, exc: Exception, started: float) -> Outcome:
        retryable = not isinstance(exc, InferenceError) or exc.retryable
        error = JobError(type=type(exc).__name__, message=str(exc) or repr(exc))
        with contextlib.suppress(Exception):
            body = (
                oa.error_body(exc)
                if isinstance(exc, InferenceError)
                else {"error": {"message": error.message, "type": "server_error"}}
            )
            self.streamer.send(
                StreamEvent(job_id=lease.job_id, lease_token=lease.lease_token, error=body)
            )
        return Outcome(
            job_id=lease.job_id,
            lease_token=lease.lease_token,
            status="failed",
            error=error,
            retryable=bool(retryable),
            device=self.device,
            timings={"run_s": time.monotonic() - started},
        )
