"""The code that runs inside a worker child process.

A child is started with the ``spawn`` method (MPS and CUDA state does not survive ``fork``),
imports its preload modules once, then runs one job at a time for as long as it lives, so
imported modules and whatever a job caches at module level (a loaded model) stay warm.

Keep this module's imports light: every child imports it before anything else.

Protocol over the child's end of a duplex :func:`multiprocessing.Pipe`:

parent -> child
    ``("run", job_id, function, payload, serializer, device)``; ``None`` asks the child to exit.
child -> parent
    ``("ready", pid, preload_errors)`` once, after the preload imports;
    ``("done", job_id, ok, result, error, retryable, import_s, run_s)`` after each job.
"""

from __future__ import annotations

import base64
import binascii
import faulthandler
import importlib
import json
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, TextIO

from hostgpu import context

# (ok, result, error, retryable, import_s, run_s)
Outcome = tuple[bool, Any, "dict[str, Any] | None", bool, float, float]

PICKLE_REFUSED = (
    'pickled arguments are only accepted by functions declared with serializer="pickle" '
    "(trusted callers only); {function} takes JSON arguments"
)


class _JobError(Exception):
    """A failure before or after the user's function ran (import, payload, result)."""

    def __init__(self, kind: str, message: str, *, error_type: str, tb: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error_type = error_type
        self.tb = tb


class _Resolved:
    __slots__ = ("call", "serializer")

    def __init__(self, call: Callable[..., Any], serializer: str) -> None:
        self.call = call
        self.serializer = serializer


_cache: dict[str, _Resolved] = {}


def _rebuild_fd(dup: Any) -> int:
    return int(dup.detach())


class InheritedFd:
    """A file descriptor handed to a spawned child as a ``Process`` argument.

    The parent passes an already-unlinked temporary file this way, so faulthandler's dump of
    a crashing child can be read back and nothing is left on disk if the parent is killed.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _rebuild_fd, (reduction.DupFd(self.fd),)


def resolve(function: str) -> tuple[_Resolved, float]:
    """Import ``package.module:qualname`` and return the callable and the import time."""
    cached = _cache.get(function)
    if cached is not None:
        return cached, 0.0
    module_name, sep, qualname = function.partition(":")
    if not sep or not module_name or not qualname:
        raise _JobError(
            "import",
            f"bad function reference {function!r}: expected 'package.module:qualname'",
            error_type="ValueError",
        )
    started = time.perf_counter()
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # an import can raise anything, SystemExit included
        raise _JobError(
            "import",
            f"cannot import module {module_name!r} for {function!r}: {exc}",
            error_type=type(exc).__name__,
            tb=traceback.format_exc(),
        ) from None
    import_s = time.perf_counter() - started
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _JobError(
                "import",
                f"module {module_name!r} has no attribute {qualname!r} (looked up for "
                f"{function!r}; is the function defined at module level?)",
                error_type="AttributeError",
            ) from None
    serializer = "json"
    options = getattr(obj, "options", None)
    if options is not None:
        serializer = str(getattr(options, "serializer", "json") or "json")
    inner = getattr(obj, "fn", None)
    call = inner if callable(inner) else obj
    if not callable(call):
        raise _JobError(
            "import",
            f"{function!r} is a {type(call).__name__}, not a callable",
            error_type="TypeError",
        )
    resolved = _Resolved(call, serializer)
    _cache[function] = resolved
    return resolved, import_s


def _decode_args(
    function: str, payload: Any, serializer: str, declared: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if serializer == "json":
        if payload is None:
            return (), {}
        if not isinstance(payload, dict) or not set(payload) <= {"args", "kwargs"}:
            raise _JobError(
                "serialization",
                'a JSON payload must be null or an object {"args": [...], "kwargs": {...}}, '
                f"got {type(payload).__name__}",
                error_type="TypeError",
            )
        args = payload.get("args") or []
        kwargs = payload.get("kwargs") or {}
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise _JobError(
                "serialization",
                'payload "args" must be an array and "kwargs" an object',
                error_type="TypeError",
            )
        return tuple(args), kwargs
    if serializer == "pickle":
        # Check the opt-in before touching the bytes: unpickling runs arbitrary code.
        if declared != "pickle":
            raise _JobError(
                "serialization", PICKLE_REFUSED.format(function=function), error_type="TypeError"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
            decoded = pickle.loads(raw)
            args, kwargs = decoded
            return tuple(args), dict(kwargs)
        except (binascii.Error, TypeError, ValueError, pickle.UnpicklingError) as exc:
            raise _JobError(
                "serialization",
                "the pickled payload must be base64 of pickle.dumps((args, kwargs)): "
                f"{type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
                tb=traceback.format_exc(),
            ) from None
        except BaseException as exc:
            raise _JobError(
                "serialization",
                f"cannot unpickle the arguments: {type(exc).__name__}: {exc}",
                error_type=type(exc).__name__,
                tb=traceback.format_exc(),
            ) from None
    raise _JobError(
        "serialization",
        f"unknown serializer {serializer!r} (expected 'json' or 'pickle')",
        error_type="ValueError",
    )


def _encode_result(function: str, result: Any, serializer: str) -> Any:
    if serializer == "pickle":
        try:
            return base64.b64encode(pickle.dumps(result)).decode("ascii")
        except BaseException as exc:
            raise _JobError(
                "serialization",
                f"{function} returned a {type(result).__name__} that cannot be pickled: {exc}",
                error_type=type(exc).__name__,
                tb=traceback.format_exc(),
            ) from None
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _JobError(
            "serialization",
            f"{function} returned a {type(result).__name__} that is not JSON-serializable "
            f"({exc}); return plain lists, dicts, strings, numbers, booleans or None "
            '(or declare the function with serializer="pickle")',
            error_type=type(exc).__name__,
        ) from None
    return result


def execute(job_id: str, function: str, payload: Any, serializer: str, device: str) -> Outcome:
    """Run one job in this process and describe what happened (never raises)."""
    import_s = 0.0
    run_s = 0.0
    context.set_job(job_id, device)
    try:
        resolved, import_s = resolve(function)
        args, kwargs = _decode_args(function, payload, serializer, resolved.serializer)
        started = time.perf_counter()
        try:
            result = resolved.call(*args, **kwargs)
        except BaseException as exc:  # SystemExit from a job must not end the child
            run_s = time.perf_counter() - started
            error = {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
                "kind": "exception",
            }
            # Bad input (PipelineError, DeviceUnavailable, …) says it is not worth retrying.
            retryable = getattr(exc, "retryable", True) is not False
            return False, None, error, retryable, import_s, run_s
        run_s = time.perf_counter() - started
        return True, _encode_result(function, result, serializer), None, True, import_s, run_s
    except _JobError as exc:
        error = {
            "type": exc.error_type,
            "message": exc.message,
            "traceback": exc.tb,
            "kind": exc.kind,
        }
        return False, None, error, False, import_s, run_s
    finally:
        context.set_job(None, None)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def main(
    conn: Connection,
    preload: Sequence[str],
    env: Mapping[str, str] | None,
    crash_fd: int | InheritedFd | None = None,
) -> None:
    """Entry point of a child process (the target of ``multiprocessing.Process``)."""
    # Ctrl-C reaches the whole process group; the parent decides how to shut down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    crash_file: TextIO | None = None
    if isinstance(crash_fd, InheritedFd):  # "fork" passes arguments without pickling
        crash_fd = crash_fd.fd
    if crash_fd is not None:
        try:
            crash_file = os.fdopen(crash_fd, "w")
            faulthandler.enable(file=crash_file, all_threads=True)
        except (OSError, ValueError):
            crash_file = None
    if env:
        os.environ.update(env)
        extra = env.get("PYTHONPATH")
        if extra:
            for entry in reversed(extra.split(os.pathsep)):
                if entry and entry not in sys.path:
                    sys.path.insert(0, entry)
    errors: list[str] = []
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    _flush()
    conn.send(("ready", os.getpid(), errors))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the parent went away
        if msg is None:
            break
        _, job_id, function, payload, serializer, device = msg
        outcome = execute(job_id, function, payload, serializer, device)
        _flush()
        try:
            conn.send(("done", job_id, *outcome))
        except (EOFError, OSError):
            break
        except Exception as exc:  # the outcome would not pickle: say so instead
            error = {
                "type": type(exc).__name__,
                "message": f"cannot send the job's outcome to the worker: {exc}",
                "traceback": traceback.format_exc(),
                "kind": "serialization",
            }
            conn.send(("done", job_id, False, None, error, False, outcome[4], outcome[5]))
    _flush()
    if crash_file is not None:
        faulthandler.disable()
        crash_file.close()
