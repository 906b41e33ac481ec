"""The native worker's control loop: start children, register, lease, run, heartbeat, report,
stop.

Start: the child pool starts first; the first child imports the worker's modules and says
which functions they publish (and which modules failed to import). The worker then registers
its devices, modules and published functions, so the gateway can hold every job to its
function's declared options. The parent never imports job code nor torch: the probe runs in
a short-lived subprocess, cached under ``HOSTGPU_HOME``.

Jobs come over the worker's channel, a WebSocket to the gateway (:mod:`hostgpu.worker.channel`):
the worker grants job slots as they free, the gateway pushes leases into them, and reports
leave on the same connection. Over plain HTTP (a gateway or proxy without WebSockets, or
``channel=False``) the worker long-polls for leases instead. Either way a lost connection
loses nothing: reports in flight are sent again, leases never delivered are handed back.

Threads:
- the caller's thread runs :meth:`WorkerAgent.run`: it leases (long-polling) whenever the
  child pool has room, and handles stopping; with a channel, a receiver thread takes its
  leases and report answers, and grants slots;
- a reporter sends outcomes in batches as soon as they exist (one message carries every
  result that finished while the previous one was in flight);
- a heartbeat thread extends leases, marks long jobs as running, and kills jobs the gateway
  says are lost (cancelled, or leased again elsewhere).
Each thread has its own HTTP client, so a long poll never delays a heartbeat.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_never, wait_exponential

import hostgpu
from hostgpu.api import MAX_LEASE, ChannelUp, ReportResponse, StreamBatch
from hostgpu.capabilities import Capabilities, Device
from hostgpu.client import Client
from hostgpu.devices.probe import Report
from hostgpu.errors import (
    AuthError,
    ChannelUnsupported,
    ConfigError,
    GatewayError,
    GatewayUnavailable,
    HostGPUError,
    InvalidInput,
    NotFound,
)
from hostgpu.functions import FunctionOptions
from hostgpu.jobs import DEFAULT_MAX_RESULT_BYTES, JobError, Lease, Outcome, ReportResult
from hostgpu.worker.batches import batches
from hostgpu.worker.inputs import InputCache
from hostgpu.worker.runner import ChildPool
from hostgpu.worker.serving import EnginePool, Streamer

if TYPE_CHECKING:  # imported when the channel opens: websockets costs a worker's start time
    from hostgpu.worker.channel import Channel

log = logging.getLogger("hostgpu.worker")

#: A channel closed sooner than this after it opened is opened again after a pause.
SHORT_LIVED_S = 10.0
#: Room left in a report for what goes with a result (ids, timings, the JSON around it).
REPORT_OVERHEAD = 64 * 1024
#: A job leased ahead waits at most this long for a child (or four times the recent mean
#: run time, if that is longer) before it goes back to the gateway for another worker: its
#: children turned out to be busy with long jobs.
PATIENCE_S = 1.0
T = TypeVar("T")

#: Built-in modules a worker offers when their dependencies are installed.
BUILTIN_MODULES: dict[str, str] = {
    "hostgpu.builtin": "",
    "hostgpu.pipelines.ingest": "sentence_transformers",
    "hostgpu.pipelines.search": "sentence_transformers",
}
#: How long the first child may take to import the worker's modules.
READY_TIMEOUT_S = 300.0


def builtin_modules() -> list[str]:
    return [
        module
        for module, needs in BUILTIN_MODULES.items()
        if not needs or importlib.util.find_spec(needs) is not None
    ]


def check_modules(modules: Sequence[str]) -> None:
    """Fail fast, in the parent and without importing, on a module that is not there."""
    for module in modules:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise ConfigError(
                f"cannot find module {module!r} to import on this worker: check the name "
                "and that it is installed or on PYTHONPATH"
            )


def child_threads(concurrency: int) -> dict[str, str]:
    """CPU threads per child: the cores shared out, so N children running torch at once do
    not each start one thread per core (on 16 cores, two children with 16 threads each ran
    slower than one). Settings the user made win."""
    share = str(max(1, (os.cpu_count() or 1) // concurrency))
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    return {name: share for name in names if name not in os.environ}


@dataclass
class WorkerConfig:
    gateway: str | None = None
    token: str | None = None
    modules: list[str] = field(default_factory=list)
    concurrency: int = 1
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    devices: list[Device] | None = None
    lease_wait: float = 25.0
    grace: float = 30.0
    started_after: float = 0.25
    skip_broken_imports: bool = False
    #: The accelerator probe (default: the cached probe of this host).
    report: Report | None = None
    #: Serve these models (registry names) instead of running functions: a model server.
    models: list[str] = field(default_factory=list)
    #: Seconds an unused model stays loaded.
    keep_alive: float = 300.0
    #: Memory the loaded models may take together (bytes; None: no limit).
    memory_budget: int | None = None
    #: Longest generation, seconds.
    generation_timeout: float = 600.0
    #: Asked before each lease: False pauses leasing (``hostgpu share --only-when-idle``).
    may_lease: Callable[[], bool] | None = None
    #: Take jobs over a WebSocket channel when the gateway offers one (else HTTP long polls).
    channel: bool = True


class WorkerAgent:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        check_modules(config.modules)
        self.unavailable: dict[str, str] = {}
        if config.devices is None:
            from hostgpu.devices import cached_report, usable_devices
            from hostgpu.settings import get_settings

            report = config.report or cached_report(get_settings().home_dir / "probe-cache.json")
            config.devices = usable_devices(report=report)
            self.unavailable = {m.kind: m.reason for m in report.missing}
        serving = bool(config.models)
        if serving and config.modules:
            raise ConfigError(
                "a worker either runs functions (--import) or serves models (hostgpu serve): "
                "start one of each"
            )
        self.modules = [] if serving else list(dict.fromkeys([*config.modules, *builtin_modules()]))
        labels = dict(config.labels)
        if serving:
            from hostgpu.inference.jobs import MODEL_LABEL_VALUE, model_label

            labels.update({model_label(m): MODEL_LABEL_VALUE for m in config.models})
        self.caps = Capabilities(
            name=config.name or f"{socket.gethostname()}-{os.getpid()}",
            hostname=socket.gethostname(),
            devices=config.devices,
            labels=labels,
            modules=self.modules,
            unavailable=self.unavailable,
            concurrency=config.concurrency,
            version=hostgpu.__version__,
            serves="models" if serving else "functions",
        )
        self.worker_id: str | None = None
        self.heartbeat_seconds = 10.0
        self._stop = threading.Event()
        self._cold = threading.Event()
        self._finished = threading.Event()
        self._room = threading.Condition()
        self._outbox: queue.Queue[Outcome | None] = queue.Queue()
        # By (job id, lease token): a job taken back (requeued, or lost and leased again)
        # can come back to this worker while its old child is still being stopped.
        self._leases: dict[tuple[str, str], tuple[Lease, float]] = {}
        self._started: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        from hostgpu.settings import get_settings

        settings = get_settings()
        #: Where a job's input blobs are fetched to (checked against their digest) before it
        #: runs; children find them through ``hostgpu.context.input_path``.
        self.inputs = InputCache(settings.home_dir / "inputs", settings.inputs_cache_bytes)
        self.inputs_dir = self.inputs.root
        self._fetcher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hostgpu-fetch")
        self.pool: ChildPool | EnginePool
        if serving:
            self.pool = self._engine_pool()
        else:
            self.pool = ChildPool(
                config.concurrency,
                self._on_result,
                preload=tuple(self.modules),
                env={
                    "HOSTGPU_INPUTS_DIR": str(self.inputs_dir),
                    **child_threads(config.concurrency),
                },
                output_limit=settings.job_output_bytes,
            )
        self.completed = 0
        self._mean_run_s: float | None = None
        #: Slots promised to a lease request in flight (the lease loop's or the reporter's).
        self._reserved = 0
        #: Whether the lease loop's long poll is in flight (it keeps an idle worker alive, as
        #: does an open channel with slots granted: the gateway waits for jobs for it).
        self._polling = False
        self._last_contact = 0.0
        #: The open channel (None: HTTP), the slots granted on it that no lease has used yet
        #: (part of ``_reserved``), and its reports not answered yet, by number.
        self._channel: Channel | None = None
        self._granted = 0
        self._unacked: dict[int, list[Outcome]] = {}
        self._answers = threading.Condition(self._lock)
        self._seq = 0
        #: An error that ended the channel's receiver and must stop the worker (a revoked token).
        self._fatal: BaseException | None = None
        #: The largest report or channel message the gateway takes (it says when registering).
        self._max_message: int | None = None
        #: Whether the gateway's channel takes back granted slots (it says when registering).
        self._channel_revoke = False
        #: Whether it takes a model server's stream batches (it says when registering).
        self._channel_streams = False
        #: Which channel this is (grants belong to one), when it opened, and how many in a row
        #: lived less than ``SHORT_LIVED_S``.
        self._epoch = 0
        self._opened_at = 0.0
        self._short_lived = 0

    def _engine_pool(self) -> EnginePool:
        from hostgpu.inference.jobs import MAX_MODELS_PER_SERVER
        from hostgpu.inference.models import load_registry

        config = self.config
        if len(config.models) > MAX_MODELS_PER_SERVER:
            raise ConfigError(f"a model server serves at most {MAX_MODELS_PER_SERVER} models")
        registry = load_registry()
        specs = {name: registry.get(name) for name in config.models}
        if config.memory_budget is not None:
            for spec in specs.values():
                if spec.estimated_memory_bytes() > config.memory_budget:
                    raise ConfigError(
                        f"{spec.name} needs about {spec.estimated_memory_bytes() / 1e9:.2f} GB, "
                        f"over the memory limit of {config.memory_budget / 1e9:.2f} GB: raise "
                        "--max-memory or serve a smaller model"
                    )
        devices = config.devices or []
        best = next((d for d in devices if d.is_accelerator), None)
        device = best.torch_device if best else "cpu"
        return EnginePool(
            specs,
            device,
            self._on_result,
            self._streamer(),
            concurrency=config.concurrency,
            keep_alive=config.keep_alive,
            memory_budget=config.memory_budget,
            timeout=config.generation_timeout,
        )

    def _cancel(self, job_id: str) -> None:
        """Stop a job nobody reads any more; a failure to is the job's, not the caller's
        (the channel's receiver, the streamer: either stopping would stop the server)."""
        try:
            self.pool.cancel(job_id)
        except Exception:
            log.exception("cancelling job %s failed", job_id)

    def _streamer(self) -> Streamer:
        streamer = Streamer(self._client, on_cancel=self._cancel)
        streamer.on_channel = self._stream_on_channel
        return streamer

    def _stream_on_channel(self, batch: StreamBatch) -> int | None:
        """Send a model server's stream batch on the channel (a message on a connection that
        is open, not a request: measured at 8 streams on 2 cores, 2-3 ms from the server to
        the gateway's reader over HTTP). Returns the channel's number; None when it cannot
        go there."""
        with self._room:
            channel, epoch = self._channel, self._epoch
        if channel is None or not self._channel_streams:
            return None
        try:
            channel.send(ChannelUp(stream=batch))
        except (HostGPUError, ValueError) as exc:  # closing, over the limit, or no encoding
            log.debug("stream batch over HTTP: %s", exc)
            return None
        return epoch

    # -- start: what the children import and publish ------------------------------------------
    def discover(self) -> None:
        """Learn the published functions from the first child (started if need be).

        A module that fails to import stops the worker with the import error (a worker that
        silently offers less than it was asked to is worse than one that does not start),
        unless ``skip_broken_imports``: then it starts without advertising that module.
        """
        self.pool.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready = None
        while ready is None and time.monotonic() < deadline and not self._stop.is_set():
            ready = self.pool.wait_ready(0.2)
        if ready is None:
            raise ConfigError(
                f"the worker's child process did not finish importing {', '.join(self.modules)} "
                f"within {READY_TIMEOUT_S:.0f} s"
            )
        requested = set(self.config.modules)
        broken = {m: e for m, e in ready.errors.items() if m in requested}
        if broken and not self.config.skip_broken_imports:
            self.pool.stop(cold=True, grace=0)
            lines = "\n".join(f"  {module}: {error}" for module, error in broken.items())
            raise ConfigError(
                f"cannot import the worker's modules:\n{lines}\n"
                "fix the import, or start with --skip-broken-imports to run without them"
            )
        for module, error in ready.errors.items():
            log.warning("not offering %s: %s", module, error)
        self.caps = self.caps.model_copy(
            update={
                "modules": [m for m in self.modules if m not in ready.errors],
                "functions": {
                    path: FunctionOptions.model_validate(options)
                    for path, options in ready.functions.items()
                },
            }
        )

    # -- gateway calls, retried while the gateway is away ------------------------------------
    def _client(self) -> Client:
        return Client(self.config.gateway, self.config.token, timeout=30.0)

    def _retrying(self, call: Callable[[], T], *, while_stopping: bool = False) -> T:
        """Call the gateway until it answers; give up at once on a cold stop, and on any stop
        unless ``while_stopping`` (reports of finished jobs are worth a few more tries)."""
        # The pause between tries ends early when the stop that ends the retrying comes.
        interrupt = self._cold if while_stopping else self._stop

        def pause(seconds: float) -> None:
            interrupt.wait(seconds)

        retry = Retrying(
            retry=retry_if_exception_type(GatewayUnavailable),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            stop=stop_never,
            sleep=pause,
            before_sleep=lambda state: log.warning(
                "gateway unreachable (%s); retrying", state.outcome and state.outcome.exception()
            ),
            reraise=True,
        )
        for attempt in retry:
            # Checked outside the attempt: raised inside it, this GatewayUnavailable would be
            # retried like any other, and a worker cut off from its gateway would never stop.
            if attempt.retry_state.attempt_number > 1 and (
                self._cold.is_set() or (self._stop.is_set() and not while_stopping)
            ):
                raise GatewayUnavailable("worker is stopping; not retrying")
            with attempt:
                return call()
        raise AssertionError("unreachable")  # pragma: no cover

    def register(self, client: Client) -> None:
        reply = self._retrying(lambda: client.register(self.caps, self.worker_id))
        self.worker_id = reply.worker_id
        if isinstance(self.pool, EnginePool):
            self.pool.streamer.worker_id = reply.worker_id
        self.heartbeat_seconds = reply.heartbeat_seconds
        if reply.max_body_bytes:
            self._max_message = reply.max_body_bytes
        self._channel_revoke = reply.channel_revoke
        self._channel_streams = reply.channel_streams
        if isinstance(self.pool, ChildPool):
            # A result must fit in a report as well as under the gateway's result limit.
            body = reply.max_body_bytes or sys.maxsize
            self.pool.max_result_bytes = min(
                reply.max_result_bytes or DEFAULT_MAX_RESULT_BYTES,
                body - min(REPORT_OVERHEAD, body // 4),
            )
        log.info(
            "registered as %s with %s; publishing %d function(s)",
            self.worker_id,
            ", ".join(f"{d.kind}:{d.name}" for d in self.caps.devices),
            len(self.caps.functions),
        )

    # -- results -------------------------------------------------------------------------------
    def _on_result(self, outcome: Outcome) -> None:
        run_s = (outcome.timings or {}).get("run_s")
        if run_s is not None:
            # An exponential moving average: recent jobs count most.
            previous = self._mean_run_s
            self._mean_run_s = run_s if previous is None else 0.8 * previous + 0.2 * run_s
        key = (outcome.job_id, outcome.lease_token)
        with self._lock:
            self._leases.pop(key, None)
            self._started.discard(key)
        self._outbox.put(outcome)
        with self._room:
            self._room.notify_all()

    def _reporter(self) -> None:
        client = self._client()
        try:
            for batch in batches(self._outbox, most=1000):
                self._send_safely(client, batch)
        finally:
            client.close()

    def _send_safely(self, client: Client, batch: list[Outcome]) -> None:
        """Send a batch, whatever happens: the reporter must go on (one that died would leave
        a busy-looking worker). A batch that fails for a reason of its own (refused as too
        large, say) goes again in halves, so one outcome cannot take the others with it; an
        outcome the gateway refuses on its own fails its job with the reason, so that its
        caller reads why instead of waiting for the lease to expire and the job to run again
        (and be refused again)."""
        try:
            self._send(client, batch)
            return
        except AuthError as exc:  # nothing this worker runs could be reported: stop
            if not self._stop.is_set():  # (a second stop request would be a cold stop)
                log.error("the gateway refused this worker's token for a report: %s", exc)
                self._fatal = exc
                self.request_stop()
            return
        except Exception as exc:
            failure = exc
        if len(batch) > 1:
            log.warning("could not report %d outcomes together (%s)", len(batch), failure)
            half = len(batch) // 2
            self._send_safely(client, batch[:half])
            self._send_safely(client, batch[half:])
            return
        [outcome] = batch
        error = outcome.error
        refused = _refused_whole(failure) and outcome.status in ("succeeded", "failed")
        if not refused or (error is not None and error.type == "ReportRefused"):
            log.error(
                "could not report job %s (%s); it runs again when its lease expires",
                outcome.job_id,
                failure,
            )
            return
        log.error(
            "job %s: the gateway refused its outcome (%s); reporting it failed",
            outcome.job_id,
            failure,
        )
        self._send_safely(
            client,
            [
                outcome.model_copy(
                    update={
                        "status": "failed",
                        "result": None,
                        "retryable": False,
                        "error": JobError(
                            type="ReportRefused",
                            message=f"the gateway refused this job's outcome: {failure}",
                            kind="limit",
                        ),
                    }
                )
            ],
        )

    def _send(self, client: Client, batch: list[Outcome]) -> None:
        if self._channel is not None and self._send_on_channel(self._channel, batch):
            return
        # While the lease loop's long poll is out, the gateway hands it the next job the
        # moment one is runnable, so leasing here too would only cost an empty store read per
        # report (a third of the store reads behind one `.remote()`). The loop polls waiting
        # for capacity during a backlog (`.map`), and then the reports do the leasing.
        busy = self._polling or self._channel is not None  # jobs come there
        room = 0 if self._stop.is_set() or busy else self._reserve()
        try:
            try:
                reply = self._report(client, batch, room)
            except GatewayUnavailable:
                log.error("dropping %d outcome(s): stopping while the gateway is away", len(batch))
                return
            # The next jobs came back with the results: no separate lease round trip.
            self._start(reply.leases)
        finally:
            self._unreserve(room)
        self._last_contact = time.monotonic()
        self._note_results(batch, reply.results)

    def _report(self, client: Client, batch: list[Outcome], room: int) -> ReportResponse:
        """One report over HTTP, retried while the gateway is away; registered again first
        if the gateway has forgotten this worker."""

        def call() -> ReportResponse:
            return client.report(self._require_id(), batch, lease=room)

        try:
            return self._retrying(call, while_stopping=True)
        except NotFound:
            self.register(client)
            return self._retrying(call, while_stopping=True)

    def _note_results(self, batch: list[Outcome], results: Sequence[ReportResult]) -> None:
        for result in results:
            if not result.accepted and result.reason:
                log.info("job %s: outcome refused (%s)", result.job_id, result.reason)
        self.completed += sum(1 for o in batch if o.status in ("succeeded", "failed"))

    def _send_on_channel(self, channel: Channel, batch: list[Outcome]) -> bool:
        """Report on the channel, granting the slots free now; False: send it over HTTP."""
        room, epoch = self._grant_room()
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._unacked[seq] = batch
        try:
            channel.send(ChannelUp(seq=seq, outcomes=batch, grant=room))
        except (GatewayError, NotFound, ValueError) as exc:  # ValueError: would not encode
            log.info("channel send failed (%s); reporting over HTTP", exc)
            with self._lock:
                self._unacked.pop(seq, None)
            self._ungrant(room, epoch)
            return False
        # One report in flight, as over HTTP: results that finish meanwhile go together in the
        # next one (a report per result cost the store a write per job, and its lease too).
        with self._answers:
            self._answers.wait_for(lambda: seq not in self._unacked, timeout=30.0)
        return True

    def _grant_room(self) -> tuple[int, int]:
        """Reserve the free slots, to grant them on the channel; with the channel's number,
        so that slots granted on a channel that is gone since are not taken back from the
        next one's."""
        with self._room:  # reentrant: _reserve takes it too
            room = 0 if self._stop.is_set() else self._reserve()
            self._granted += room
            return room, self._epoch

    def _ungrant(self, room: int, epoch: int) -> None:
        with self._room:
            if epoch != self._epoch:
                return  # that channel's grants went with it
            room = min(room, self._granted)
            self._granted -= room
            self._unreserve(room)

    # -- the channel -----------------------------------------------------------------------------
    def _open_channel(self, client: Client) -> Channel | None:
        """Open the channel, retrying while the gateway is away (None: it has none)."""
        from hostgpu.worker.channel import Channel

        while True:
            try:
                channel = self._retrying(
                    lambda: Channel.open(
                        client.gateway,
                        client.token,
                        self._require_id(),
                        max_message=self._max_message,
                    )
                )
                self._opened_at = time.monotonic()
                return channel
            except ChannelUnsupported as exc:
                log.info("no worker channel (%s); leasing over HTTP long polls", exc)
                return None
            except NotFound:
                self.register(client)

    def _channel_loop(self, client: Client, channel: Channel) -> None:
        """Receive leases and report answers; grant slots as they free (a report grants
        them too); on a lost connection, open a new one (reports go over HTTP meanwhile)."""
        current: Channel | None = channel
        try:
            while current is not None:
                try:
                    room, epoch = self._grant_room()
                    if room:
                        current.send(ChannelUp(grant=room))
                    message = current.receive(timeout=1.0)
                except (GatewayError, NotFound) as exc:
                    if isinstance(exc, AuthError):
                        raise
                    with contextlib.suppress(Exception):
                        current.close()
                    current = self._channel_lost(client, exc)
                    continue
                if message is None:
                    continue
                self._last_contact = time.monotonic()
                if message.leases:
                    self._start(message.leases)
                    self._ungrant(len(message.leases), epoch)
                if message.seq is not None:
                    self._answered(message.seq, message.results)
                for job_id in message.cancelled:  # nobody reads its stream any more
                    self._cancel(job_id)
        except Exception as exc:  # a worker that took no more jobs would look healthy: stop
            if isinstance(exc, AuthError):
                log.error("the gateway refused this worker's token on its channel: %s", exc)
            else:
                log.exception("the worker's channel failed; stopping")
            self._fatal = exc
            self.request_stop()
        finally:
            client.close()

    def _answered(self, seq: int, results: Sequence[ReportResult]) -> None:
        with self._answers:
            batch = self._unacked.pop(seq, [])
            self._answers.notify_all()
        self._note_results(batch, results)

    def _unanswered(self) -> list[Outcome]:
        """Take the outcomes of the reports the channel did not answer (to send again)."""
        with self._answers:
            outcomes = [o for batch in self._unacked.values() for o in batch]
            self._unacked.clear()
            self._answers.notify_all()
        return outcomes

    def _channel_lost(self, client: Client, exc: BaseException) -> Channel | None:
        """The connection is gone: its grants with it; its unanswered reports go again.
        Returns the new channel (None: closing, or the gateway has channels no more)."""
        with self._room:
            self._channel = None
            self._epoch += 1
            self._reserved -= self._granted
            self._granted = 0
            self._room.notify_all()
        # A channel that dies young (the gateway closing it on an error, a proxy refusing it)
        # is opened again after a growing pause, not in a tight loop.
        lived = time.monotonic() - self._opened_at
        self._short_lived = self._short_lived + 1 if lived < SHORT_LIVED_S else 0
        unanswered = self._unanswered()
        if self._stop.is_set():
            # Stopping: the reporter may be gone already, and no channel is opened again.
            if unanswered:
                self._send_safely(client, unanswered)
            return None
        for outcome in unanswered:
            self._outbox.put(outcome)
        if isinstance(exc, ChannelUnsupported):
            log.warning("worker channel failed (%s); leasing over HTTP long polls", exc)
            self._lease_loop(client)
            return None
        log.warning("worker channel lost (%s); opening it again", exc)
        if self._short_lived:
            self._stop.wait(min(5.0, 0.2 * 2 ** (self._short_lived - 1)))
        if isinstance(exc, NotFound):
            self.register(client)
        try:
            channel = None if self._stop.is_set() else self._open_channel(client)
        except GatewayUnavailable:  # stopping
            return None
        if channel is None:
            if not self._stop.is_set():
                self._lease_loop(client)  # the gateway has no channel any more: HTTP
            return None
        with self._room:
            if self._stop.is_set():  # the stop came while it opened
                channel.close()
                return None
            self._channel = channel
        return channel

    def _close_channel(self, client: Client, receiver: threading.Thread) -> None:
        """Stopping (``_stop`` is set): wait for the last reports' answers, then close."""
        if receiver.is_alive():
            with self._answers:
                self._answers.wait_for(lambda: not self._unacked, timeout=10.0)
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        receiver.join(timeout=15)
        if unanswered := self._unanswered():
            self._send_safely(client, unanswered)

    def _require_id(self) -> str:
        assert self.worker_id is not None
        return self.worker_id

    # -- heartbeats ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        client = self._client()
        next_beat = 0.0
        tick = min(self.config.started_after, self.heartbeat_seconds)
        try:
            while not self._finished.is_set():
                now = time.monotonic()
                self._mark_started(now)
                self._hand_back_waiting()
                if now >= next_beat:
                    self._beat(client)
                    next_beat = now + self.heartbeat_seconds
                self._finished.wait(tick)
        finally:
            client.close()

    def _mark_started(self, now: float) -> None:
        # Short jobs finish before anyone looks; only jobs still running after
        # `started_after` cost a write to say so.
        # Only jobs a child is really running count: prefetched jobs still waiting for a
        # child are leased, not started.
        executing = self.pool.executing()
        with self._lock:
            fresh = [
                lease
                for key, (lease, at) in self._leases.items()
                if key in executing
                and key not in self._started
                and now - at >= self.config.started_after
            ]
            self._started.update((lease.job_id, lease.lease_token) for lease in fresh)
        for lease in fresh:
            self._outbox.put(
                Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status="started")
            )

    def _hand_back_waiting(self) -> None:
        """Jobs leased ahead that still wait for a child, whose children all turned out to be
        busy with long jobs, go back to the gateway for another worker (a short job would
        otherwise wait for a long one to end), and the slots granted ahead are taken back."""
        if not isinstance(self.pool, ChildPool):
            return
        waiting = self.pool.take_waiting(self._patience())
        if not waiting:
            return
        log.info(
            "handing back %d job(s) that waited over %.1f s for a busy child",
            len(waiting),
            self._patience(),
        )
        self._revoke_grants()
        self._release(waiting)

    def _revoke_grants(self) -> None:
        with self._room:
            channel = self._channel
            if channel is None or not self._channel_revoke or not self._granted:
                return
            try:
                channel.send(ChannelUp(revoke=True))
            except (GatewayError, ValueError):
                return  # the channel is closing: its grants go with it
            # A grant another thread reserved before this and sends after it stays at the
            # gateway: leases beyond what this worker counts wait, and come back here.
            self._reserved -= self._granted
            self._granted = 0
            self._room.notify_all()

    def _beat(self, client: Client) -> None:
        with self._lock:
            held = [(lease.job_id, lease.lease_token) for lease, _ in self._leases.values()]
        if not held and (
            self._polling
            or (self._channel is not None and self._granted > 0)
            or time.monotonic() - self._last_contact < self.heartbeat_seconds
        ):
            # Idle: the long poll in flight (or, on the channel, the gateway waiting for jobs
            # for the slots granted) keeps this worker alive there: a heartbeat would only be
            # another write.
            return
        try:
            lost = client.heartbeat(self._require_id(), held)
        except NotFound:
            log.warning("the gateway does not know this worker (restarted?); registering again")
            self.register(client)
            return
        except GatewayUnavailable as exc:
            log.warning("heartbeat failed: %s", exc)
            return
        for job_id, token in lost:
            log.warning("job %s is no longer ours (cancelled or re-leased); stopping it", job_id)
            self.pool.cancel(job_id, token)

    # -- the lease loop ------------------------------------------------------------------------
    def _prefetch(self) -> int:
        """Extra jobs per child to hold in hand, from how long jobs have been taking.

        Short jobs would leave children idle between lease round trips, so the worker
        leases ahead (up to 32 per child for jobs of a few ms); jobs of a second or more
        are only leased when a child is free, so they stay available to other workers.
        """
        mean = self._mean_run_s
        if mean is None:
            return 1
        if mean >= 1.0:
            return 0
        return max(1, min(32, int(0.1 / max(mean, 1e-4))))

    def _patience(self) -> float:
        return max(PATIENCE_S, 4 * (self._mean_run_s or 0.0))

    def _capacity(self) -> int:
        # Everything in the pool counts, queued tasks included (the pool's free_slots() is
        # floored at zero and would hide how far past the limit the worker already is), and so
        # do slots promised to a lease request in flight.
        if self.config.may_lease is not None and not self.config.may_lease():
            return 0
        # A model server holds one lease per stream: generations are long and batch on the
        # engine, so leasing ahead would only take work from other servers. Nor is anything
        # leased ahead for a child busy with a long job: it would wait for that job's end.
        limit = self.config.concurrency
        if isinstance(self.pool, ChildPool):
            quick = limit - self.pool.long_running(self._patience())
            limit += self._prefetch() * max(0, quick)
        with self._lock:
            held = len(self._leases)  # in a child, queued for one, or fetching its inputs
        return limit - held - self._reserved

    def _reserve(self) -> int:
        with self._room:
            room = max(0, min(MAX_LEASE, self._capacity()))
            self._reserved += room
            return room

    def _unreserve(self, room: int) -> None:
        with self._room:
            self._reserved -= room
            self._room.notify_all()

    def _start(self, leases: Sequence[Lease]) -> None:
        ready: list[Lease] = []
        for lease in leases:
            if self._stop.is_set():
                self._release([lease])
                continue
            # Under the cache's lock: a trim sees this lease's inputs held, or this lease
            # sees them gone and fetches them again.
            with self.inputs.lock:
                with self._lock:
                    self._leases[(lease.job_id, lease.lease_token)] = (lease, time.monotonic())
                missing = self.inputs.missing(lease.inputs)
            if missing:
                # Fetched off the lease loop; the lease is held (and heartbeated) meanwhile.
                self._fetcher.submit(self._fetch_then_run, lease, missing)
            else:
                ready.append(lease)
        if ready:
            # Together: a model server starts them on its engine in one batching step.
            self._submit(ready)

    def _submit(self, leases: Sequence[Lease]) -> None:
        try:
            self.pool.submit_all(leases)
        except RuntimeError:  # the pool began stopping meanwhile: none was taken
            self._release(leases)

    def _fetch_then_run(self, lease: Lease, digests: list[str]) -> None:
        try:
            with self._client() as client:
                for digest in digests:
                    client.fetch_blob(digest, self.inputs.path(digest))
        except Exception as exc:  # a missing or damaged blob fails this attempt, retryably
            self._trim_inputs()  # a full disk: room for the retry
            error = JobError(
                type=type(exc).__name__,
                message=f"could not fetch the job's inputs: {exc}",
                kind="input",
            )
            self._on_result(
                Outcome(
                    job_id=lease.job_id,
                    lease_token=lease.lease_token,
                    status="failed",
                    error=error,
                    retryable=True,
                    device=lease.device.torch_device,
                )
            )
            return
        self._trim_inputs()
        if self._stop.is_set():
            self._release([lease])
        else:
            self._submit([lease])

    def _trim_inputs(self) -> None:
        try:
            self.inputs.trim(self._held_inputs)
        except OSError as exc:  # a read-only or broken folder: the jobs can still run
            log.warning("could not trim the input cache in %s: %s", self.inputs.root, exc)

    def _held_inputs(self) -> set[str]:
        """The inputs of the jobs this worker holds (fetched, running or about to)."""
        with self._lock:
            return {digest for lease, _ in self._leases.values() for digest in lease.inputs}

    def _poll_seconds(self) -> float:
        # Long enough that an idle fleet costs the store almost nothing, short enough that
        # the poll (which marks the worker alive when it starts) keeps it alive: the gateway
        # counts a worker lost after 3 heartbeat periods without contact.
        return min(self.config.lease_wait, 2.5 * self.heartbeat_seconds)

    def _lease_loop(self, client: Client) -> None:
        while not self._stop.is_set():
            room = self._reserve()
            if room <= 0:
                self._unreserve(0)
                with self._room:
                    self._room.wait_for(
                        lambda: self._capacity() > 0 or self._stop.is_set(), timeout=1.0
                    )
                continue
            self._polling = True
            try:
                leases = self._retrying(
                    functools.partial(
                        client.lease, self._require_id(), max_jobs=room, wait=self._poll_seconds()
                    )
                )
                self._last_contact = time.monotonic()
                self._start(leases)
            except NotFound:
                self.register(client)
                continue
            except GatewayUnavailable:
                return
            finally:
                self._polling = False
                self._unreserve(room)

    def _release(self, leases: Sequence[Lease]) -> None:
        for lease in leases:
            with self._lock:
                self._leases.pop((lease.job_id, lease.lease_token), None)
            self._outbox.put(
                Outcome(job_id=lease.job_id, lease_token=lease.lease_token, status="released")
            )

    # -- lifecycle -----------------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        """First call: warm stop (finish running jobs). Second: cold stop (kill them)."""
        if self._stop.is_set():
            log.warning("second stop request: killing running jobs and handing them back")
            self._cold.set()
        else:
            log.warning("stopping: no new jobs; finishing running ones (again to kill them)")
            self._stop.set()
            if self.worker_id is not None:
                # End the long poll in flight now, at the gateway: otherwise the stop waits
                # for it (and the gateway could still hand this worker a job meanwhile).
                threading.Thread(target=self._drain, name="hostgpu-drain", daemon=True).start()
        with self._room:
            self._room.notify_all()

    def _drain(self) -> None:
        try:
            with self._client() as client:
                client.drain(self._require_id())
        except Exception as exc:  # the gateway may be away: the poll ends at its timeout
            log.info("could not tell the gateway this worker is draining: %s", exc)

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, on_ready: Callable[[WorkerAgent], None] | None = None) -> int:
        """Register at once (devices, modules), then publish the functions as soon as the
        first child has imported them, and lease. The children start meanwhile: a worker is
        registered within about a second, whatever its modules cost to import."""
        self.pool.start()
        client = self._client()
        try:
            self.register(client)
            if not self.caps.functions:
                try:
                    self.discover()
                except ConfigError:
                    self._deregister(client)
                    raise
                if self._stop.is_set():
                    raise GatewayUnavailable("stopped while starting")
                self.register(client)  # the same id, now with its published functions
        except GatewayUnavailable:
            log.warning("stopped before the worker was ready")
            self.pool.stop(cold=True, grace=0)
            self._deregister(client)
            client.close()
            return 0
        reporter = threading.Thread(target=self._reporter, name="hostgpu-reporter", daemon=True)
        beater = threading.Thread(
            target=self._heartbeat_loop, name="hostgpu-heartbeat", daemon=True
        )
        reporter.start()
        beater.start()
        receiver: threading.Thread | None = None
        try:
            # A lender that pauses while its machine is busy (``may_lease``) long-polls: slots
            # granted on a channel would stay open to the gateway while it is busy.
            use_channel = self.config.channel and self.config.may_lease is None
            try:
                channel = self._open_channel(client) if use_channel else None
            except GatewayUnavailable:  # stopped before it opened
                channel = None
            if on_ready:
                on_ready(self)
            if channel is None:
                self._lease_loop(client)
            else:
                self._channel = channel
                receiver = threading.Thread(
                    target=self._channel_loop,
                    args=(self._client(), channel),
                    name="hostgpu-channel",
                    daemon=True,
                )
                receiver.start()
                self._stop.wait()
        finally:
            self._shutdown(client, reporter, beater, receiver)
        if self._fatal is not None:
            raise self._fatal
        return 0

    def _shutdown(
        self,
        client: Client,
        reporter: threading.Thread,
        beater: threading.Thread,
        receiver: threading.Thread | None = None,
    ) -> None:
        self._stop.set()
        deadline = time.monotonic() + self.config.grace
        while not self._cold.is_set() and time.monotonic() < deadline:
            if self.pool.wait_idle(0.2):
                break
        # Past the grace (or cold): kill the children still running and hand their jobs back,
        # so no child keeps running a job that the gateway gives to another worker.
        unfinished = self.pool.stop(cold=True, grace=0)
        if unfinished:
            log.warning("handing back %d unfinished job(s)", len(unfinished))
            self._release(unfinished)
        self._finished.set()
        self._outbox.put(None)
        reporter.join(timeout=30)
        if receiver is not None:
            self._close_channel(client, receiver)
            # Leases pushed after the reporter stopped were handed back into its queue.
            leftover = []
            with contextlib.suppress(queue.Empty):
                while True:
                    item = self._outbox.get_nowait()
                    if item is not None:
                        leftover.append(item)
            if leftover:
                self._send_safely(client, leftover)
        beater.join(timeout=5)
        self._deregister(client)
        client.close()
        log.info("worker stopped after %d job(s)", self.completed)

    def _deregister(self, client: Client) -> None:
        try:
            if self.worker_id:
                client.deregister(self.worker_id)
        except Exception as exc:  # the gateway may be gone; it will expire us
            log.info("could not deregister: %s", exc)


def _refused_whole(exc: Exception) -> bool:
    """Whether the gateway (or a proxy before it) refused a report as such: too large (413)
    or invalid (422). Not a refused token, nor an unreachable gateway: those are not about
    what the report holds, and sending it in parts would not help."""
    if isinstance(exc, InvalidInput):
        return True
    return (
        isinstance(exc, GatewayError)
        and not isinstance(exc, AuthError | GatewayUnavailable)
        and exc.status == 413
    )
