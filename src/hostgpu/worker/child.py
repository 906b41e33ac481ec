"""The code that runs inside a worker child process.

A child is started with the ``spawn`` method (MPS and CUDA state does not survive ``fork``),
imports its preload modules once, then runs one job at a time for as long as it lives, so
imported modules and whatever a job caches at module level (a loaded model) stay warm.

Only functions published in the registry (``@hostgpu.function`` or ``hostgpu.register``, in
the modules the child imports) run: a job naming anything else — ``os.system``, a class, a
module attribute — fails at once, never retried. This is the worker's trust boundary.

Keep this module's imports light: every child imports it before anything else.

Messages over the child's end of a duplex :func:`multiprocessing.Pipe` (named tuples):

parent -> child
    :class:`Run` per job; ``None`` asks the child to exit.
child -> parent
    :class:`Ready` once, after the preload imports, with the functions they published;
    :class:`Done` after each job.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import faulthandler
import importlib
import json
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, NamedTuple, TextIO

from hostgpu import context
from hostgpu.functions import Published, lookup, not_published_message, published
from hostgpu.jsontext import MAX_JSON_DEPTH, json_depth, lone_surrogate, too_deep

PICKLE_REFUSED = (
    'pickled arguments are only accepted by functions declared with serializer="pickle" '
    "(trusted callers only); {function} takes JSON arguments"
)
#: Modules whose absence means the ml extra is not installed.
ML_MODULES = frozenset(
    {"torch", "sentence_transformers", "transformers", "chromadb", "pypdfium2", "PIL"}
)


class Run(NamedTuple):
    """parent → child: run one job."""

    job_id: str
    function: str
    payload: Any  # json: {"args": [...], "kwargs": {...}} or None; pickle: a base64 str
    serializer: str
    device: str  # torch device string: "cpu", "cuda:0", "mps"
    max_result_bytes: int  # the gateway's limit: a larger result fails here, readably


class Ready(NamedTuple):
    """child → parent, once: the preload imports are done."""

    pid: int
    errors: dict[str, str]  # module → why it failed to import
    functions: dict[str, dict[str, Any]]  # path → declared options (JSON-able)


class Done(NamedTuple):
    """child → parent: what happened to one job."""

    job_id: str
    ok: bool
    result: Any
    error: dict[str, Any] | None  # a JobError as a dict
    retryable: bool
    import_s: float
    run_s: float


class _Refused(Exception):
    """A failure before or after the user's function ran (import, payload, result)."""

    def __init__(self, kind: str, message: str, *, error_type: str, tb: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.error_type = error_type
        self.tb = tb

    @classmethod
    def caught(cls, kind: str, message: str, exc: BaseException) -> _Refused:
        """The refusal for ``exc``, being handled now: its type and traceback go along."""
        return cls(kind, message, error_type=type(exc).__name__, tb=traceback.format_exc())

    def error(self) -> dict[str, Any]:
        return _error(self.error_type, self.message, self.tb, self.kind)


def _error(error_type: str, message: str, tb: str, kind: str) -> dict[str, Any]:
    """A :class:`hostgpu.jobs.JobError` as the dict the report carries (built here, not by
    the model: pydantic would weigh on every child's start)."""
    return {"type": error_type, "message": message, "traceback": tb, "kind": kind}


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


def import_error_message(module: str, exc: BaseException) -> str:
    """Why ``module`` failed to import, with the fix when it is the ml extra."""
    missing = getattr(exc, "name", None)
    if isinstance(exc, ModuleNotFoundError) and missing:
        top = missing.partition(".")[0]
        if top in ML_MODULES:
            return (
                f"{module} needs {top}, from the ml extra: pip install 'hostgpu[ml]' "
                f"(ModuleNotFoundError: {exc})"
            )
        if missing == module or module.startswith(missing + "."):
            return f"no module named {missing!r}: check the name and PYTHONPATH"
    return f"{type(exc).__name__}: {exc}"


def resolve(function: str) -> tuple[Published, float]:
    """The published function at ``function`` ("package.module:qualname") and the import time."""
    found = lookup(function)
    if found is not None:
        return found, 0.0
    module_name, sep, qualname = function.partition(":")
    if not sep or not module_name or not qualname:
        raise _Refused(
            "import",
            f"bad function reference {function!r}: expected 'package.module:qualname'",
            error_type="ValueError",
        )
    started = time.perf_counter()
    try:
        importlib.import_module(module_name)
    except BaseException as exc:  # an import can raise anything, SystemExit included
        raise _Refused.caught(
            "import",
            f"cannot import {module_name!r} for {function!r}: "
            + import_error_message(module_name, exc),
            exc,
        ) from None
    import_s = time.perf_counter() - started
    found = lookup(function)
    if found is None:
        raise _Refused("forbidden", not_published_message(function), error_type="NotPublished")
    return found, import_s


def _decode_args(
    function: str, payload: Any, serializer: str, declared: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if serializer not in ("json", "pickle"):
        raise _Refused(
            "serialization",
            f"unknown serializer {serializer!r} (expected 'json' or 'pickle')",
            error_type="ValueError",
        )
    if serializer != declared:
        # The declaration decides: a JSON function never unpickles, whatever the job says.
        if serializer == "pickle":
            message = PICKLE_REFUSED.format(function=function)
        else:
            message = f"{function} takes pickled arguments (serializer='pickle'), not JSON"
        raise _Refused("serialization", message, error_type="TypeError")
    if serializer == "json":
        if payload is None:
            return (), {}
        if not isinstance(payload, dict) or not set(payload) <= {"args", "kwargs"}:
            raise _Refused(
                "serialization",
                'a JSON payload must be null or an object {"args": [...], "kwargs": {...}}, '
                f"got {type(payload).__name__}",
                error_type="TypeError",
            )
        args = payload.get("args") or []
        kwargs = payload.get("kwargs") or {}
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            raise _Refused(
                "serialization",
                'payload "args" must be an array and "kwargs" an object',
                error_type="TypeError",
            )
        return tuple(args), kwargs
    if serializer == "pickle":
        try:
            raw = base64.b64decode(payload, validate=True)
            args, kwargs = pickle.loads(raw)
            return tuple(args), dict(kwargs)
        except (binascii.Error, TypeError, ValueError, pickle.UnpicklingError) as exc:
            raise _Refused.caught(
                "serialization",
                "the pickled payload must be base64 of pickle.dumps((args, kwargs)): "
                f"{type(exc).__name__}: {exc}",
                exc,
            ) from None
        except BaseException as exc:
            raise _Refused.caught(
                "serialization", f"cannot unpickle the arguments: {type(exc).__name__}: {exc}", exc
            ) from None
    raise AssertionError(serializer)  # pragma: no cover - checked above


def _encode_result(function: str, result: Any, serializer: str, limit: int) -> Any:
    if serializer == "pickle":
        try:
            encoded: Any = base64.b64encode(pickle.dumps(result)).decode("ascii")
        except BaseException as exc:
            raise _Refused.caught(
                "serialization",
                f"{function} returned a {type(result).__name__} that cannot be pickled: {exc}",
                exc,
            ) from None
        size = len(encoded) + 2  # a JSON string
    else:
        try:
            # Measured as the gateway measures (compact, ASCII: characters are bytes).
            text = json.dumps(result, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError) as exc:
            raise _Refused(
                "serialization",
                f"{function} returned a {type(result).__name__} that is not JSON-serializable "
                f"({exc}); return plain lists, dicts, strings, finite numbers, booleans or None "
                '(or declare the function with serializer="pickle")',
                error_type=type(exc).__name__,
            ) from None
        if "\\ud" in text and lone_surrogate(text.encode()):
            raise _Refused(
                "serialization",
                f"{function} returned a string with a lone surrogate in it, which is not text "
                "(os.listdir and friends give one for a file name that is not valid UTF-8): "
                "return os.fsencode(name).decode('utf-8', 'backslashreplace'), or bytes as "
                'base64, or declare the function with serializer="pickle"',
                error_type="UnicodeEncodeError",
            )
        if too_deep(text.encode()):
            raise _Refused(
                "serialization",
                f"{function} returned a value nested {json_depth(text.encode())} levels deep; "
                f"the gateway takes {MAX_JSON_DEPTH}: return flatter data (or declare the "
                'function with serializer="pickle")',
                error_type="TooDeep",
            )
        size = len(text)
        encoded = result
    if size > limit:
        # Checked here, not only by the gateway: a report over its body limit would be
        # refused whole, and the job would wait for its lease to expire, then run again.
        from hostgpu.jobs import result_too_large  # rare: keep the child's start light

        error = result_too_large(size, limit)
        raise _Refused(error.kind, error.message, error_type=error.type)
    return encoded


def _describe(exc: BaseException) -> dict[str, Any]:
    """The job's exception as an error record. Its ``str()`` and traceback are the user's
    code too: if they raise, the record says so instead of the child dying with the job."""
    try:
        message = str(exc)
    except Exception as inner:
        message = f"(its str() raised {type(inner).__name__}: {inner!r})"
    try:
        tb = "".join(traceback.format_exception(exc))
    except Exception:
        tb = "".join(traceback.format_tb(exc.__traceback__))
    return _error(type(exc).__name__, message, tb, "exception")


def execute(run: Run) -> Done:
    """Run one job in this process and describe what happened (never raises)."""
    import_s = 0.0
    run_s = 0.0
    context.set_job(run.job_id, run.device)
    try:
        entry, import_s = resolve(run.function)
        args, kwargs = _decode_args(
            run.function, run.payload, run.serializer, entry.options.serializer
        )
        started = time.perf_counter()
        try:
            result = entry.fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit from a job must not end the child
            run_s = time.perf_counter() - started
            error = _describe(exc)
            # Bad input (PipelineError, DeviceUnavailable, …) says it is not worth retrying.
            try:
                retryable = getattr(exc, "retryable", True) is not False
            except Exception:  # a property that raises: the exception is still the job's
                retryable = True
            return Done(run.job_id, False, None, error, retryable, import_s, run_s)
        run_s = time.perf_counter() - started
        encoded = _encode_result(run.function, result, run.serializer, run.max_result_bytes)
        return Done(run.job_id, True, encoded, None, True, import_s, run_s)
    except _Refused as exc:
        return Done(run.job_id, False, None, exc.error(), False, import_s, run_s)
    finally:
        context.set_job(None, None)


class _Baseline(NamedTuple):
    """The working directory and environment every job starts with: what one job changes
    there is undone before the next, which may be another caller's, so that no job sees
    another's ``os.chdir`` or ``os.environ["TOKEN"] = …``."""

    cwd: str | None  # None: the child started in a directory that is gone
    environ: dict[Any, Any]

    @classmethod
    def now(cls) -> _Baseline:
        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None
        return cls(cwd, dict(_environ_data()))

    def restore(self) -> None:
        if self.cwd is not None:
            try:
                moved = os.getcwd() != self.cwd
            except OSError:  # the job removed the directory it moved to
                moved = True
            if moved:
                with contextlib.suppress(OSError):
                    os.chdir(self.cwd)
        now = _environ_data()
        if now == self.environ:
            return
        # Only what differs, so that nothing else sees the environment empty meanwhile.
        name = os.fsdecode if _RAW_ENVIRON else str
        for key in [k for k in now if k not in self.environ]:
            os.environ.pop(name(key), None)
        for key, value in self.environ.items():
            if now.get(key) != value:
                os.environ[name(key)] = name(value)


#: CPython keeps the environment as bytes in ``os.environ._data``: comparing that is 1 µs a
#: job, comparing ``os.environ`` itself 35 (it decodes every entry).
_RAW_ENVIRON = isinstance(getattr(os.environ, "_data", None), dict)


def _environ_data() -> Mapping[Any, Any]:
    return os.environ._data if _RAW_ENVIRON else os.environ  # type: ignore[attr-defined]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


def _preload(modules: Sequence[str]) -> Ready:
    errors: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            errors[name] = import_error_message(name, exc)
    loaded = [m for m in modules if m not in errors]
    functions = {
        path: options.model_dump(mode="json") for path, options in published(loaded).items()
    }
    return Ready(os.getpid(), errors, functions)


def _apply_env(env: Mapping[str, str] | None) -> None:
    if not env:
        return
    os.environ.update(env)
    extra = env.get("PYTHONPATH")
    if extra:
        for entry in reversed(extra.split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)


def _redirect_output(fds: Sequence[int | InheritedFd]) -> None:
    """Make fds 1 and 2 the worker's pipes (``worker/output.py``), for this process and
    whatever it starts, so the worker bounds what each job writes."""
    _flush()
    for target, fd in zip((1, 2), fds, strict=True):
        number = fd.fd if isinstance(fd, InheritedFd) else fd  # "fork" passes them as they are
        os.dup2(number, target)
        os.close(number)


def main(
    conn: Connection,
    preload: Sequence[str],
    env: Mapping[str, str] | None,
    crash_fd: int | InheritedFd | None = None,
    output_fds: Sequence[int | InheritedFd] | None = None,
) -> None:
    """Entry point of a child process (the target of ``multiprocessing.Process``)."""
    if output_fds is not None:
        _redirect_output(output_fds)
    # Ctrl-C reaches the whole process group; the parent decides how to shut down. So does a
    # service manager's SIGTERM to the whole group: the parent's warm stop lets jobs finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    crash_file: TextIO | None = None
    if isinstance(crash_fd, InheritedFd):  # "fork" passes arguments without pickling
        crash_fd = crash_fd.fd
    if crash_fd is not None:
        try:
            crash_file = os.fdopen(crash_fd, "w")
            faulthandler.enable(file=crash_file, all_threads=True)
        except (OSError, ValueError):
            crash_file = None
    _apply_env(env)
    ready = _preload(preload)
    _flush()
    conn.send(ready)
    me = os.getpid()
    start = _Baseline.now()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break  # the parent went away
        if msg is None:
            break
        done = execute(msg)
        if os.getpid() != me:
            # A job forked this process and its copy returned here: only this child may
            # answer on the pipe, or take the next job. The copy ends now, silently (its
            # buffered output is this child's to write).
            os._exit(0)
        start.restore()
        _flush()
        try:
            conn.send(done)
        except (EOFError, OSError):
            break
        except Exception as exc:  # the outcome would not pickle: say so instead
            error = {
                "type": type(exc).__name__,
                "message": f"cannot send the job's outcome to the worker: {exc}",
                "traceback": traceback.format_exc(),
                "kind": "serialization",
            }
            conn.send(done._replace(ok=False, result=None, error=error, retryable=False))
    _flush()
    if crash_file is not None:
        faulthandler.disable()
        crash_file.close()
