"""What runs inside a Ray worker process for one hostgpu call (a task or a warm actor's call).

The same rules as a hostgpu worker's child (it is the same code: :func:`hostgpu.worker.child.
execute`): only functions published with ``@hostgpu.function`` run, the declaration decides
the serializer, results must be JSON unless the function is declared ``pickle``, and
``hostgpu.device()`` returns the device the call was given. On top of that, what a worker's
parent process does for a lease:

- the declared ``timeout``: ``SIGALRM`` interrupts the function (Ray runs tasks and
  single-threaded actor calls on the worker's main thread); a function stuck in native code
  that never returns to Python is ended with its worker process ten seconds later, which Ray
  sees as a lost worker and retries (like a lost lease);
- ``retries``: a failure that is not marked ``retryable = False`` runs again after the same
  backoff as on the gateway (:class:`hostgpu.retry.RetryPolicy`), in the same process;
- a submission may narrow the function's declaration, never widen it (the worker-side check
  of :func:`hostgpu.functions.resolve`): a driver that declares or asks for more than the
  cluster's copy of the function publishes is refused.

A call returns an envelope ``(ok, value, device, error)`` rather than raising, so a
function's own exception never reaches Ray's retry machinery: Ray retries only lost workers
and nodes (``max_retries``), hostgpu retries failures (``retries``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from functools import lru_cache
from typing import Any

from hostgpu.functions import FunctionOptions, Requested, lookup, resolve
from hostgpu.ray.resources import NODE_ENV

#: A function still running this long after its timeout fired ends its worker process.
HARD_KILL_AFTER_S = 10.0
#: ``(gpu, memory, labels, timeout, retries, serializer, fallback)`` of a declaration.
Declared = tuple[str, float | None, tuple[tuple[str, str], ...], float, int, str, str | None]
Envelope = tuple[bool, Any, str, dict[str, Any] | None]


def declared_key(options: FunctionOptions) -> Declared:
    return (
        options.gpu,
        options.memory,
        tuple(sorted(options.labels.items())),
        options.timeout,
        options.retries,
        options.serializer,
        options.fallback,
    )


class CallTimedOut(BaseException):
    """The call ran past its declared timeout.

    A BaseException, so a function's own ``except Exception`` does not swallow it.
    """


# -- the device ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def node_description() -> dict[str, Any]:
    """What ``hostgpu ray start`` told this node (empty on a node Ray started alone)."""
    try:
        return dict(json.loads(os.environ.get(NODE_ENV) or "{}"))
    except ValueError:
        return {}


def _node_has_mac_gpu() -> bool:
    return any(d.get("kind") in ("mps", "mlx") for d in node_description().get("devices", []))


def device_for(kind: str) -> str:
    """The torch device string for a call whose request was resolved to ``kind``."""
    if kind == "cuda":
        if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
            import ray

            ids = ray.get_gpu_ids()
            return f"cuda:{ids[0]}" if ids else "cuda"
        # Ray set CUDA_VISIBLE_DEVICES to the GPU it assigned: it is device 0 in here.
        return "cuda:0"
    if kind in ("mps", "mlx", "gpu"):
        return "mps"  # MLX uses the GPU through Metal, as Device.torch_device says
    if kind == "any" and _node_has_mac_gpu():
        return "mps"
    return "cpu"


# -- the timeout -----------------------------------------------------------------------------
class _Watchdog:
    """SIGALRM for the declared timeout; a thread that ends the process when even that fails."""

    def __init__(self) -> None:
        self.deadline = 0.0  # monotonic; 0: nothing running
        self.timeout = 0.0
        self.fired = False
        self.installed = False
        self.thread: threading.Thread | None = None

    def _on_alarm(self, signum: int, frame: Any) -> None:
        self.fired = True
        raise CallTimedOut(f"timed out after {self.timeout:g} s (the function's timeout)")

    def _guard(self) -> None:
        while True:
            time.sleep(1.0)
            deadline = self.deadline
            if deadline and time.monotonic() > deadline + HARD_KILL_AFTER_S:
                # The function ignored the alarm (stuck in native code): end this worker,
                # as a hostgpu worker kills a child that overran. Ray retries it elsewhere.
                os._exit(70)

    def arm(self, timeout: float) -> bool:
        """Start timing a call; False where signals cannot be used (not the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if not self.installed:
            signal.signal(signal.SIGALRM, self._on_alarm)
            self.installed = True
        if self.thread is None:
            self.thread = threading.Thread(target=self._guard, name="hostgpu-watchdog", daemon=True)
            self.thread.start()
        self.fired = False
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        signal.setitimer(signal.ITIMER_REAL, timeout)
        return True

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        self.deadline = 0.0


_watchdog = _Watchdog()


# -- one call --------------------------------------------------------------------------------
def _job_id() -> str:
    """The Ray task id of the running call (``hostgpu.job_id()``)."""
    import ray

    # Asking outside a worker would start a local Ray instance: never from here.
    if not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_task_id() or "ray"


@lru_cache(maxsize=256)
def _declared(path: str) -> Declared | None:
    entry = lookup(path)
    return declared_key(entry.options) if entry is not None else None


def _check_declaration(path: str, asked: Declared) -> dict[str, Any] | None:
    """A refusal when the call asks for more than the function's declaration here."""
    import importlib

    if lookup(path) is None:
        try:
            importlib.import_module(path.partition(":")[0])
        except BaseException:
            return None  # child.execute reports the import error with the fix
    here = _declared(path) if lookup(path) is not None else None
    if here is None or here == asked:
        return None
    entry = lookup(path)
    assert entry is not None
    gpu, memory, labels, timeout, retries, serializer, fallback = asked
    try:
        resolve(
            path,
            entry.options,
            Requested(
                gpu=gpu,
                min_memory_gb=memory,
                labels=dict(labels),
                timeout_s=timeout,
                max_retries=retries,
                serializer=serializer,  # type: ignore[arg-type]
                fallback="cpu" if fallback == "cpu" else "none",
            ),
        )
    except Exception as exc:  # OptionsConflict: the driver's copy widens this one
        return {
            "type": type(exc).__name__,
            "message": f"{exc} (the driver's declaration of {path} differs from the Ray "
            "node's: install the same version of the code on both)",
            "traceback": "",
            "kind": "forbidden",
        }
    return None


def run_call(
    path: str,
    payload: Any,
    serializer: str,
    kind: str,
    asked: Declared,
) -> Envelope:
    """Run one call here with its timeout and retries; never raises for the function's sake."""
    from hostgpu.retry import RetryPolicy
    from hostgpu.settings import get_settings
    from hostgpu.worker.child import Run, execute

    device = device_for(kind)
    refusal = _check_declaration(path, asked)
    if refusal is not None:
        return False, None, device, refusal
    timeout, retries = asked[3], asked[4]
    job_id = _job_id()
    failures = 0
    policy: RetryPolicy | None = None
    while True:
        armed = False
        try:
            armed = _watchdog.arm(timeout)
            # Results travel in Ray's object store, not in a gateway's report: no size limit.
            done = execute(Run(job_id, path, payload, serializer, device, sys.maxsize))
        except CallTimedOut as exc:  # fired outside the function (encoding its result)
            done = None
            error: dict[str, Any] | None = {
                "type": "Timeout",
                "message": str(exc),
                "traceback": traceback.format_exc(),
                "kind": "timeout",
            }
        finally:
            if armed:
                _watchdog.disarm()
        if done is not None:
            if done.ok:
                return True, done.result, device, None
            error = dict(done.error or {})
            if error.get("type") == "CallTimedOut":
                error.update(type="Timeout", kind="timeout")
            retryable = done.retryable
        else:
            retryable = True
        failures += 1
        if policy is None:
            settings = get_settings()
            policy = RetryPolicy(settings.retry_base_seconds, settings.retry_max_seconds)
        decision = policy.after_failure(failures, retries, retryable=retryable)
        if not decision.again:
            assert error is not None
            error["attempts"] = failures
            error["gave_up"] = decision.reason
            return False, None, device, error
        time.sleep(decision.delay_s)


#: What a task gets: ``(path, payload, serializer, kind, declared)`` in one argument (Ray
#: serializes each argument of a task on its own: one is cheaper than five).
Call = tuple[str, Any, str, str, Declared]


def run_task(call: Call) -> Envelope:
    """The Ray task (the backend wraps it with ``ray.remote``)."""
    return run_call(*call)


class WarmRunner:
    """A Ray actor that runs calls of one function in one process, so what the function
    keeps at module level (a loaded model) stays loaded between calls."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.calls = 0

    def call(self, call: Call) -> Envelope:
        self.calls += 1
        return run_call(*call)
