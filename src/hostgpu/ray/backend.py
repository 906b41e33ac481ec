"""hostgpu functions as Ray tasks and actors: ``hostgpu.connect("ray://HOST:10001")``.

The same decorator, routing rule, ``hostgpu.device()``, serializers and errors as with a
gateway; where Ray and the gateway differ, this module says how:

- **Where a call runs**: the function's ``gpu``/``memory``/``labels`` become Ray resources
  and a label selector (:mod:`hostgpu.ray.resources`); Ray places the task.
- **Waiting**: a call no live node can ever run is reported at once as
  ``waiting: no Ray node with mps`` (from the nodes' totals, Ray's own feasibility test,
  with the probe's reason from nodes started by ``hostgpu ray start``); ``.result(timeout)``
  raises :class:`JobTimeout` with it, :attr:`RayHandle.waiting` and ``.status()`` show it.
- **Fallback**: with ``fallback="cpu"`` declared, a call that no node can run for the grace
  period (``HOSTGPU_FALLBACK_GRACE_SECONDS``) is cancelled and submitted for the CPU;
  :attr:`RayHandle.fallback_used` says so. Never without the declaration.
- **Retries**: Ray re-runs a call whose worker or node died (``max_retries`` =
  ``HOSTGPU_MAX_LOST_LEASES``, as lost leases on a gateway); the function's own failures and
  timeouts use its declared ``retries`` (:mod:`hostgpu.ray.runner`).
- **Warm functions** (``warm=True``): calls go to Ray actors (one per node that can run the
  function, created when the earlier ones are busy), so what the function loads at module
  level stays loaded; an actor holds its device share (a whole GPU on CUDA) while this
  backend is connected.
- **Lifetime**: Ray ties calls to the driver that submitted them: they end when this
  process disconnects (a gateway keeps queued jobs in its store).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from hostgpu.errors import ConfigError, JobCancelled, JobFailed, JobTimeout
from hostgpu.functions import FunctionOptions
from hostgpu.ray.resources import NODE_ENV, NodeView, Request, request_for, waiting_reason
from hostgpu.ray.runner import Call, Declared, Envelope, WarmRunner, declared_key, run_task
from hostgpu.requirements import Requirements
from hostgpu.sdk import (
    WAITING_NOTICE_S,
    MapOptions,
    decode_result,
    encode_arguments,
    map_progress,
)
from hostgpu.settings import get_settings

if TYPE_CHECKING:
    from hostgpu.sdk import Function

R = TypeVar("R")
log = logging.getLogger("hostgpu")

#: How old the backend's view of the cluster's nodes may be.
NODES_TTL_S = 1.0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("the Ray backend needs Ray: pip install 'hostgpu[ray]'") from None
    return ray


def _payload(args: tuple[Any, ...], kwargs: dict[str, Any], serializer: str) -> Any:
    """The arguments as a gateway job carries them (JSON values, or base64 of a pickle)."""
    if serializer == "json":
        try:
            json.dumps([args, kwargs], allow_nan=False)
        except (TypeError, ValueError):
            encode_arguments(args, kwargs, serializer)  # raises the SDK's own TypeError
            raise
        return {"args": list(args), "kwargs": kwargs}
    return encode_arguments(args, kwargs, serializer)


class RayHandle(Generic[R]):
    """A call submitted to Ray: ``result(timeout)``, ``status()``, ``cancel()``, and what a
    gateway's job record would say: :attr:`waiting`, :attr:`device`, :attr:`fallback_used`."""

    def __init__(
        self,
        backend: RayBackend,
        fn: Function[..., R],
        request: Request,
        ref: Any,
        *,
        actor: bool = False,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        self.function = fn.path
        self.request = request
        self.ref = ref
        self.id: str = _ref_id(ref)
        self.fallback_used = False
        #: The device the call ran on (after it finished), e.g. ``mps`` or ``cuda:0``.
        self.device: str | None = None
        self._fn = fn
        self._actor = actor
        self._args = args
        self._kwargs = kwargs or {}
        self._serializer = fn.options.serializer
        self._fallback = fn.options.fallback
        self._submitted = time.monotonic()
        self._done: tuple[str, Any] | None = None  # ("ok", value) | ("error", exception)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RayHandle({self.id[:16]!r}, {self.function})"

    # -- what it says about itself --------------------------------------------------------
    @property
    def waiting(self) -> str | None:
        """Why the call cannot run yet (``waiting: no Ray node with mps``), or None."""
        if self._done is not None:
            return None
        return self._backend.waiting_for(self.request, self._fallback)

    def status(self) -> str:
        """``queued`` (no node can run it: see :attr:`waiting`), ``submitted`` (Ray has it:
        queued or running), ``succeeded``, ``failed`` or ``cancelled``."""
        self._look()
        if self._done is not None:
            kind, value = self._done
            if kind == "ok":
                return "succeeded"
            return "cancelled" if isinstance(value, JobCancelled) else "failed"
        return "queued" if self.waiting else "submitted"

    def cancel(self) -> None:
        """Cancel the call: a queued one never starts, a running task's worker is stopped;
        a finished call keeps its outcome."""
        self._look()
        with self._lock:
            if self._done is not None:
                return  # finished first: its outcome stands
            ref = self.ref
            self._done = ("error", JobCancelled(f"call {self.id} was cancelled", job_id=self.id))
        self._backend._forget(self)
        # force=True ends a running task's worker (Ray's polite cancel cannot interrupt a
        # function blocked in a sleep or native call); actor calls cannot be forced.
        _ray().cancel(ref, force=not self._actor)

    def _look(self) -> None:
        """Settle the call now if Ray already has its outcome (without waiting for it)."""
        if self._done is None:
            ready, _ = _ray().wait([self.ref], timeout=0)
            if ready:
                self._settle(ready[0])

    def result(self, timeout: float | None = None) -> R:
        """Wait for the result; raises JobFailed (with the remote traceback), JobCancelled,
        or JobTimeout (with the waiting reason) when ``timeout`` seconds pass first."""
        ray = _ray()
        deadline = None if timeout is None else time.monotonic() + timeout
        said: str | None = None
        started = time.monotonic()
        while self._done is None:
            ref = self.ref
            early = time.monotonic() - started < 3 * WAITING_NOTICE_S
            step = 0.25 if early else 5.0
            if deadline is not None:
                step = max(0.0, min(step, deadline - time.monotonic()))
            ready, _ = ray.wait([ref], timeout=step)
            if ready:
                self._settle(ref)
                continue
            reason = self.waiting
            if reason and reason != said and time.monotonic() - started >= WAITING_NOTICE_S:
                log.warning("call %s (%s): %s", self.id[:12], self.function, reason)
                said = reason
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(
                    f"call {self.id} ({self.function}) is still "
                    + ("queued" if reason else "not finished")
                    + f" after {timeout} s"
                    + (f" ({reason})" if reason else ""),
                    job_id=self.id,
                )
        return self._value()

    # -- internals -------------------------------------------------------------------------
    def _settle(self, ref: Any) -> None:
        """Record the outcome of ``ref`` (a finished ObjectRef of this call)."""
        ray = _ray()
        try:
            envelope = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            with self._lock:
                if self.ref is not ref or self._done is not None:
                    return  # replaced by the fallback, or cancelled through this handle
                self._done = (
                    "error",
                    JobCancelled(f"call {self.id} was cancelled", job_id=self.id),
                )
            return
        except ray.exceptions.RayError as exc:
            self._finish_error(exc)
            return
        self._finish(envelope)

    def _finish(self, envelope: Envelope) -> None:
        ok, value, device, error = envelope
        self.device = device
        if ok:
            self._done = ("ok", decode_result(value, self._serializer))
            return
        error = error or {}
        attempts = error.get("attempts", 1)
        summary = f"{error.get('type', 'Error')}: {error.get('message', '')}".strip()
        self._done = (
            "error",
            JobFailed(
                f"call {self.id} ({self.function}) failed after {attempts} attempt(s) on "
                f"{device}: {summary}",
                job_id=self.id,
                error_type=error.get("type"),
                remote_traceback=error.get("traceback") or None,
            ),
        )

    def _finish_error(self, exc: BaseException) -> None:
        ray = _ray()
        lost = (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OwnerDiedError,
            ray.exceptions.ObjectLostError,
            ray.exceptions.RayActorError,
        )
        if isinstance(exc, lost):
            message = (
                f"call {self.id} ({self.function}) lost its Ray worker or node more often than "
                f"HOSTGPU_MAX_LOST_LEASES={get_settings().max_lost_leases} allows "
                f"(or it ran past its timeout inside native code): {type(exc).__name__}"
            )
        else:
            message = f"call {self.id} ({self.function}) failed in Ray: {type(exc).__name__}"
        self._done = (
            "error",
            JobFailed(
                message,
                job_id=self.id,
                error_type=type(exc).__name__,
                remote_traceback=str(exc),
            ),
        )

    def _value(self) -> R:
        assert self._done is not None
        kind, value = self._done
        if kind == "error":
            raise value
        return value

    def _fall_back(self) -> None:
        """Move the call to the CPU (the declared fallback, after the grace period)."""
        ray = _ray()
        with self._lock:
            if self._done is not None or self.fallback_used:
                return
            old = self.ref
            cpu = Requirements(gpu="cpu", labels=dict(self.request.labels))
            request = request_for(cpu, num_cpus=self.request.num_cpus)
            self.ref = self._backend._submit(
                self._fn, self._args, self._kwargs, request, gpu="cpu"
            )[0]
            self.request = request
            self.fallback_used = True
        log.warning(
            "call %s (%s): no Ray node could run it within the grace period; running it on "
            "a CPU as its fallback='cpu' allows",
            self.id[:12],
            self.function,
        )
        ray.cancel(old)


def _ref_id(ref: Any) -> str:
    try:
        return str(ref.task_id().hex())
    except Exception:  # not every kind of ref has a task id
        return uuid.uuid4().hex


class _WarmActor:
    def __init__(self, handle: Any, node_id: str | None) -> None:
        self.handle = handle
        self.node_id = node_id
        self.inflight: list[Any] = []


class WarmPool:
    """The actors serving one warm function: one per node that can run it, at most."""

    def __init__(self, backend: RayBackend, path: str, request: Request) -> None:
        self.backend = backend
        self.path = path
        self.request = request
        self.actors: list[_WarmActor] = []
        self.lock = threading.Lock()

    def _prune(self) -> None:
        ray = _ray()
        for actor in self.actors:
            if actor.inflight:
                _, still = ray.wait(actor.inflight, num_returns=len(actor.inflight), timeout=0)
                actor.inflight = list(still)

    def _create(self, node_id: str | None) -> _WarmActor:
        _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options = self.request.ray_options()
        options.update(
            num_cpus=self.request.num_cpus,
            max_restarts=-1,
            max_task_retries=get_settings().max_lost_leases,
            max_concurrency=1,
            name=None,
        )
        if node_id is not None:
            # soft: when the node dies, Ray restarts the actor on another node that fits.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
        handle = self.backend._actor_class.options(**options).remote(self.path)
        actor = _WarmActor(handle, node_id)
        self.actors.append(actor)
        return actor

    def submit(self, call: Call) -> Any:
        with self.lock:
            self._prune()
            actor = next((a for a in self.actors if not a.inflight), None)
            if actor is None:
                taken = {a.node_id for a in self.actors}
                from hostgpu.ray.resources import fits

                free_nodes = [
                    n.node_id
                    for n in self.backend.nodes()
                    if fits(self.request, n) and n.node_id not in taken
                ]
                if free_nodes or not self.actors:
                    actor = self._create(free_nodes[0] if free_nodes else None)
                else:
                    actor = min(self.actors, key=lambda a: len(a.inflight))
            ref = actor.handle.call.remote(call)
            actor.inflight.append(ref)
            return ref

    def close(self) -> None:
        ray = _ray()
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone with its node
                ray.kill(actor.handle)
        self.actors.clear()


class RayBackend:
    """Where ``.remote()``, ``.spawn()`` and ``.map()`` go after ``hostgpu.connect("ray://…")``.

    ``address``: ``ray://HOST:PORT`` (Ray Client), or ``ray`` for ``ray.init()``'s default:
    ``RAY_ADDRESS``, else a cluster running on this machine, else a new local one that
    advertises this machine's probed devices. ``runtime_env`` is passed to ``ray.init``
    (e.g. ``{"working_dir": "."}`` to ship your code to the nodes).
    """

    def __init__(self, address: str = "ray", *, runtime_env: dict[str, Any] | None = None):
        ray = _ray()
        self.address = address
        self._owns_ray = False
        if not ray.is_initialized():
            self._init(ray, address, runtime_env)
            self._owns_ray = True
        self._task = ray.remote(run_task)
        self._actor_class = ray.remote(WarmRunner)
        self._options: dict[tuple[str, Request], Any] = {}
        self._requests: dict[int, tuple[FunctionOptions, Request]] = {}
        self._pools: dict[tuple[str, Request], WarmPool] = {}
        self._nodes: list[NodeView] = []
        self._nodes_at = 0.0
        self._node_reasons: dict[str, dict[str, str]] = {}
        self._reasons_asked: set[str] = set()
        self._fallbacks: weakref.WeakSet[RayHandle[Any]] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._max_lost = get_settings().max_lost_leases

    # -- connecting -------------------------------------------------------------------------
    @staticmethod
    def _init(ray: Any, address: str, runtime_env: dict[str, Any] | None) -> None:
        common: dict[str, Any] = {"logging_level": logging.WARNING}
        if runtime_env:
            common["runtime_env"] = runtime_env
        if address.startswith("ray://"):
            for attempt in range(3):
                try:
                    ray.init(address, **common)
                    return
                except ConnectionError:
                    # Ray Client's proxy sometimes loses the race with the server process
                    # it starts for a new client (ray.util.client.server.proxier); the next
                    # connection gets a fresh one.
                    if attempt == 2:
                        raise
                    time.sleep(1.0)
        if address != "ray":
            raise ConfigError(f"{address!r} is not a Ray address: use ray://HOST:PORT or ray")
        if os.environ.get("RAY_ADDRESS"):
            ray.init(**common)
            return
        try:
            ray.init(address="auto", **common)
            return
        except ConnectionError:
            pass
        # No cluster: start one here that advertises this machine's devices, on loopback.
        from hostgpu.devices import cached_report
        from hostgpu.ray.resources import advertise

        settings = get_settings()
        advert = advertise(cached_report(settings.home_dir / "probe-cache.json"))
        os.environ[NODE_ENV] = advert.node_json()  # the local workers inherit it
        ray.init(
            num_gpus=advert.num_gpus,
            resources=advert.resources,
            labels=advert.labels or None,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            **common,
        )

    def close(self) -> None:
        self._closed.set()
        for pool in list(self._pools.values()):
            pool.close()
        self._pools.clear()
        if self._owns_ray:
            ray = _ray()
            if ray.is_initialized():
                ray.shutdown()

    # -- the cluster --------------------------------------------------------------------------
    def nodes(self) -> list[NodeView]:
        """The live nodes (at most NODES_TTL_S old)."""
        now = time.monotonic()
        if now - self._nodes_at > NODES_TTL_S:
            ray = _ray()
            self._nodes = [
                NodeView(
                    node_id=n["NodeID"],
                    address=f"{n.get('NodeManagerAddress')}:{n.get('NodeManagerPort')}",
                    resources=dict(n.get("Resources") or {}),
                    labels=dict(n.get("Labels") or {}),
                )
                for n in ray.nodes()
                if n.get("Alive")
            ]
            self._nodes_at = now
        return self._nodes

    def waiting_for(self, request: Request, fallback: str | None = None) -> str | None:
        nodes = self.nodes()
        reason = waiting_reason(request, nodes, self._node_reasons, fallback=fallback)
        if reason is not None:
            self._ask_reasons(nodes)
        return reason

    def _ask_reasons(self, nodes: Sequence[NodeView]) -> None:
        """Fetch, once per node and in the background, why each node lacks what it lacks."""
        new = [n for n in nodes if n.node_id not in self._reasons_asked]
        if not new:
            return
        self._reasons_asked.update(n.node_id for n in new)

        def fetch() -> None:
            for node_id, description in node_descriptions([n.node_id for n in new]).items():
                if description:
                    self._node_reasons[node_id] = dict(description.get("unavailable") or {})

        threading.Thread(target=fetch, name="hostgpu-ray-reasons", daemon=True).start()

    # -- submitting ---------------------------------------------------------------------------
    def _request(self, fn: Function[..., Any]) -> Request:
        options = fn.options
        cached = self._requests.get(id(options))
        if cached is not None and cached[0] is options:
            return cached[1]
        req = options.requirements()
        if req.kind == "gpu":  # decided by the cluster of the moment: never cached
            return request_for(req, self.nodes(), num_cpus=0 if options.warm else 1)
        request = request_for(req, num_cpus=0 if options.warm else 1)
        # Keyed by the (frozen) options object, kept alive here so its id stays its own.
        self._requests[id(options)] = (options, request)
        return request

    def _asked(self, fn: Function[..., Any], gpu: str | None = None) -> Declared:
        key = declared_key(fn.options)
        return key if gpu is None else (gpu, *key[1:])

    def _submit(
        self,
        fn: Function[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        request: Request,
        *,
        gpu: str | None = None,
    ) -> tuple[Any, bool]:
        serializer = fn.options.serializer
        path = fn.path
        payload = _payload(args, kwargs, serializer)
        call: Call = (path, payload, serializer, request.kind, self._asked(fn, gpu))
        if fn.options.warm:
            key = (path, request)
            pool = self._pools.get(key)
            if pool is None:
                pool = self._pools.setdefault(key, WarmPool(self, path, request))
            return pool.submit(call), True
        remote = self._options.get((path, request))
        if remote is None:
            remote = self._task.options(
                name=fn.__qualname__,
                max_retries=self._max_lost,
                retry_exceptions=False,
                **request.ray_options(),
            )
            self._options[(path, request)] = remote
        return remote.remote(call), False

    def spawn(
        self, fn: Function[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> RayHandle[R]:
        request = self._request(fn)
        ref, actor = self._submit(fn, args, kwargs, request)
        handle: RayHandle[R] = RayHandle(
            self, fn, request, ref, actor=actor, args=args, kwargs=kwargs
        )
        if fn.options.fallback == "cpu" and request.kind != "cpu":
            self._watch_fallback(handle)
        return handle

    def _forget(self, handle: RayHandle[Any]) -> None:
        self._fallbacks.discard(handle)

    def _watch_fallback(self, handle: RayHandle[Any]) -> None:
        self._fallbacks.add(handle)
        with self._lock:
            if self._watcher is None:
                self._watcher = threading.Thread(
                    target=self._watch, name="hostgpu-ray-fallback", daemon=True
                )
                self._watcher.start()

    def _watch(self) -> None:
        """Move calls that no node could run for the grace period to the CPU."""
        while not self._closed.wait(0.5):
            grace = get_settings().fallback_grace_seconds
            for handle in list(self._fallbacks):
                if handle._done is not None or handle.fallback_used:
                    self._fallbacks.discard(handle)
                    continue
                if time.monotonic() - handle._submitted < grace:
                    continue
                try:
                    if self.waiting_for(handle.request) is not None:
                        handle._fall_back()
                    self._fallbacks.discard(handle)
                except Exception:  # the cluster went away: the caller sees it on result()
                    log.debug("fallback check failed", exc_info=True)

    def map(
        self, fn: Function[..., R], items: Sequence[tuple[Any, ...]], options: MapOptions
    ) -> list[Any]:
        ray = _ray()
        deadline = options.deadline()
        results: list[Any] = [None] * len(items)
        with map_progress(fn.__name__, len(items), enabled=options.progress) as bars:
            bar, submitted, finished = bars
            handles: list[RayHandle[R]] = []
            for _start, chunk in options.chunks(items):
                handles.extend(self.spawn(fn, args, {}) for args in chunk)
                bar.advance(submitted, len(chunk))
            pending: dict[Any, int] = {h.ref: i for i, h in enumerate(handles)}
            started = time.monotonic()
            said: str | None = None
            while pending:
                now = time.monotonic()
                step = 0.25 if now - started < 3 * WAITING_NOTICE_S else 5.0
                if deadline is not None:
                    step = max(0.0, min(step, deadline - now))
                window = list(pending)[:1000]
                ready, _ = ray.wait(window, num_returns=len(window), timeout=step)
                if not ready:
                    first = handles[next(iter(pending.values()))]
                    reason = first.waiting
                    if reason and reason != said and now - started >= WAITING_NOTICE_S:
                        log.warning("%s: %s", fn.__name__, reason)
                        said = reason
                    if deadline is not None and time.monotonic() >= deadline:
                        raise JobTimeout(
                            f"{len(pending)} of {len(items)} calls unfinished after "
                            f"{options.timeout} s" + (f" ({reason})" if reason else "")
                        )
                    continue
                try:
                    envelopes = ray.get(ready)
                except ray.exceptions.RayError:
                    envelopes = None  # settle them one by one below
                for position, ref in enumerate(ready):
                    index = pending.pop(ref)
                    handle = handles[index]
                    if handle.ref is not ref:  # moved to the CPU by the fallback
                        pending[handle.ref] = index
                        continue
                    if envelopes is not None:
                        handle._finish(envelopes[position])
                    else:
                        handle._settle(ref)
                    if handle._done is None:  # replaced meanwhile
                        pending[handle.ref] = index
                        continue
                    kind, value = handle._done
                    if kind == "ok" or options.return_exceptions:
                        results[index] = value
                    else:
                        raise value
                    bar.advance(finished)
        return results


def _describe_node() -> str | None:
    return os.environ.get(NODE_ENV)


def node_descriptions(node_ids: Sequence[str], timeout: float = 20.0) -> dict[str, Any]:
    """What ``hostgpu ray start`` told each node (``HOSTGPU_RAY_NODE``), asked by a zero-CPU
    task pinned to it; None for nodes that were not started by hostgpu or did not answer."""
    import json

    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    describe = ray.remote(num_cpus=0, max_retries=0)(_describe_node)
    refs = {
        node_id: describe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote()
        for node_id in node_ids
    }
    if not refs:
        return {}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
    done = set(ready)
    found: dict[str, Any] = {}
    for node_id, ref in refs.items():
        text = None
        if ref in done:
            try:
                text = ray.get(ref)
            except ray.exceptions.RayError:
                text = None
        else:
            ray.cancel(ref, force=True)
        try:
            found[node_id] = json.loads(text) if text else None
        except ValueError:
            found[node_id] = None
    return found
