"""Long-lived child processes that run jobs, and the supervisor that watches them.

Each child is started with ``spawn`` (MPS and CUDA state does not survive ``fork``) and
runs many jobs, so imports and models a job caches stay warm. One supervisor thread
multiplexes every child's pipe and process sentinel with
:func:`multiprocessing.connection.wait`, so dispatch costs no thread per job and no
polling. A job that overruns its timeout, or that the gateway cancels, is stopped by
killing its child (a hung CUDA call cannot be interrupted politely); a child that dies
(segfault, ``os._exit``, OOM kill) fails only its own job. Either way a fresh child
replaces it and the worker carries on.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from hostgpu.worker import child as child_module

log = logging.getLogger("hostgpu.worker.runner")


@dataclass
class Task:
    job_id: str
    lease_token: str
    function: str
    payload: Any
    serializer: str
    timeout_s: float
    device: str


@dataclass
class TaskResult:
    job_id: str
    lease_token: str
    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    retryable: bool = True
    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Child:
    proc: Any
    conn: Connection
    crash_log: Path
    ready: bool = False
    task: Task | None = None
    submitted_at: float = 0.0
    started_at: float = 0.0
    deadline: float = 0.0
    #: Why the supervisor killed it ("timeout" or "cancelled"), so its death is explained.
    killed_for: str | None = None


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "an unknown cause"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


class ChildPool:
    """``concurrency`` children, a queue of tasks, and results through ``on_result``."""

    def __init__(
        self,
        concurrency: int,
        on_result: Callable[[TaskResult], None],
        *,
        preload: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        mp_context: str = "spawn",
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.on_result = on_result
        self.preload = tuple(preload)
        self.env = dict(env or {})
        self._ctx: Any = multiprocessing.get_context(mp_context)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[tuple[Task, float]] = deque()
        self._children: list[_Child] = []
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._accepting = True
        self._logdir = Path(tempfile.mkdtemp(prefix="hostgpu-children-"))

    # -- children ---------------------------------------------------------------------------
    def _spawn(self) -> _Child:
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        crash_log = self._logdir / f"crash-{time.monotonic_ns()}.log"
        proc = self._ctx.Process(
            target=child_module.main,
            args=(child_end, self.preload, self.env, str(crash_log)),
            name="hostgpu-child",
            daemon=True,
        )
        proc.start()
        child_end.close()
        return _Child(proc=proc, conn=parent_end, crash_log=crash_log)

    def start(self) -> None:
        with self._lock:
            self._children = [self._spawn() for _ in range(self.concurrency)]
        self._thread = threading.Thread(target=self._supervise, name="hostgpu-pool", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closing
            self._wake_w.send_bytes(b"!")

    # -- the public, thread-safe surface ------------------------------------------------------
    def submit(self, task: Task) -> None:
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the pool is stopping")
            self._queue.append((task, time.monotonic()))
        self._wake()

    def free_slots(self) -> int:
        with self._lock:
            busy = sum(1 for c in self._children if c.task is not None)
            return self.concurrency - busy - len(self._queue)

    def running(self) -> list[Task]:
        with self._lock:
            return [c.task for c in self._children if c.task is not None] + [
                t for t, _ in self._queue
            ]

    def cancel(self, job_id: str) -> bool:
        dropped: Task | None = None
        with self._lock:
            for index, (task, _) in enumerate(self._queue):
                if task.job_id == job_id:
                    dropped = task
                    del self._queue[index]
                    break
            else:
                for c in self._children:
                    if c.task is not None and c.task.job_id == job_id:
                        c.killed_for = "cancelled"
                        self._kill(c)
                        return True
                return False
        self._deliver(
            self._failure(
                dropped, "cancelled", "Cancelled", "the job was cancelled", retryable=False
            )
        )
        return True

    def wait_idle(self, timeout: float | None) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._queue and all(c.task is None for c in self._children), timeout
            )

    def stop(self, *, cold: bool = False, grace: float = 30.0) -> list[Task]:
        """Stop the children; return tasks that did not finish (on_result is not called)."""
        with self._lock:
            self._accepting = False
        if not cold:
            self.wait_idle(grace)
        with self._lock:
            self._closing = True
            unfinished = [t for t, _ in self._queue]
            self._queue.clear()
            for c in self._children:
                if c.task is not None:
                    unfinished.append(c.task)
                    c.task = None
                    self._kill(c)
                else:
                    with contextlib.suppress(OSError):
                        c.conn.send(None)
            children = list(self._children)
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for c in children:
            c.proc.join(timeout=5)
            if c.proc.is_alive():
                self._kill(c)
                c.proc.join(timeout=5)
            c.conn.close()
        return unfinished

    # -- supervision ------------------------------------------------------------------------------
    @staticmethod
    def _kill(c: _Child) -> None:
        if c.proc.pid is not None and c.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, signal.SIGKILL)

    def _dispatch(self) -> None:
        """Hand queued tasks to idle, ready children (lock held)."""
        for c in self._children:
            if not self._queue:
                return
            if c.ready and c.task is None and c.killed_for is None:
                task, submitted = self._queue.popleft()
                now = time.monotonic()
                c.task, c.submitted_at, c.started_at = task, submitted, now
                c.deadline = now + task.timeout_s
                # An OSError means the child is dying; its sentinel will explain.
                with contextlib.suppress(OSError):
                    c.conn.send(
                        (
                            "run",
                            task.job_id,
                            task.function,
                            task.payload,
                            task.serializer,
                            task.device,
                        )
                    )

    def _supervise(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                self._dispatch()
                now = time.monotonic()
                for c in self._children:
                    if c.task is not None and c.killed_for is None and now >= c.deadline:
                        c.killed_for = "timeout"
                        self._kill(c)
                deadlines = [
                    c.deadline
                    for c in self._children
                    if c.task is not None and c.killed_for is None
                ]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                by_conn = {c.conn: c for c in self._children}
                by_sentinel = {c.proc.sentinel: c for c in self._children}
            ready = wait([self._wake_r, *by_conn, *by_sentinel], timeout)
            results: list[TaskResult] = []
            with self._lock:
                if self._closing:
                    return
                if self._wake_r in ready:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                # Messages first: a child that sent its result and then died has
                # finished its job; only then look at which children exited.
                for obj in ready:
                    talker = by_conn.get(obj)  # type: ignore[call-overload]
                    if talker is not None and talker.killed_for is None:
                        results += self._receive(talker)
                for obj in ready:
                    exited = by_sentinel.get(obj)
                    if exited is not None and exited in self._children:
                        results += self._replace(exited)
                self._dispatch()
                self._changed.notify_all()
            for result in results:
                self._deliver(result)

    def _receive(self, c: _Child) -> list[TaskResult]:
        out: list[TaskResult] = []
        while True:
            try:
                if not c.conn.poll():
                    return out
                message = c.conn.recv()
            except (EOFError, OSError):
                return out  # the sentinel reports the death
            if message[0] == "ready":
                c.ready = True
                if message[2]:
                    log.warning("preloading failed in a worker child: %s", "; ".join(message[2]))
            elif message[0] == "done" and c.task is not None:
                _, _job_id, ok, result, error, retryable, import_s, run_s = message
                task, c.task = c.task, None
                done = time.monotonic()
                out.append(
                    TaskResult(
                        job_id=task.job_id,
                        lease_token=task.lease_token,
                        status="succeeded" if ok else "failed",
                        result=result,
                        error=error,
                        retryable=retryable,
                        device=task.device,
                        timings={
                            "queue_s": c.started_at - c.submitted_at,
                            "import_s": import_s,
                            "run_s": run_s,
                            "total_s": done - c.submitted_at,
                        },
                    )
                )

    def _replace(self, c: _Child) -> list[TaskResult]:
        """A child exited: explain its job's end and start a fresh child in its place."""
        c.proc.join(timeout=1)
        out: list[TaskResult] = []
        if c.task is not None:
            task = c.task
            if c.killed_for == "timeout":
                out.append(
                    self._failure(
                        task,
                        "timeout",
                        "TimeoutError",
                        f"job exceeded its timeout of {task.timeout_s:g} s and was killed",
                        retryable=True,
                        started=c.started_at,
                        submitted=c.submitted_at,
                    )
                )
            elif c.killed_for == "cancelled":
                out.append(
                    self._failure(
                        task,
                        "cancelled",
                        "Cancelled",
                        "the job was cancelled and its process killed",
                        retryable=False,
                        started=c.started_at,
                        submitted=c.submitted_at,
                    )
                )
            else:
                crash = (
                    c.crash_log.read_text(errors="replace")[-4000:] if c.crash_log.exists() else ""
                )
                out.append(
                    self._failure(
                        task,
                        "crash",
                        "WorkerChildDied",
                        f"worker child died with {_signal_name(c.proc.exitcode)} while running "
                        "the job (the worker survived; a native crash, os._exit or an OOM kill)",
                        retryable=True,
                        traceback=crash,
                        started=c.started_at,
                        submitted=c.submitted_at,
                    )
                )
        elif not self._closing:
            log.warning(
                "a worker child exited with %s while idle; replacing it",
                _signal_name(c.proc.exitcode),
            )
        c.conn.close()
        c.crash_log.unlink(missing_ok=True)
        index = self._children.index(c)
        if self._closing:
            self._children.pop(index)
        else:
            self._children[index] = self._spawn()
        return out

    @staticmethod
    def _failure(
        task: Task,
        kind: str,
        error_type: str,
        message: str,
        *,
        retryable: bool,
        traceback: str = "",
        started: float | None = None,
        submitted: float | None = None,
    ) -> TaskResult:
        now = time.monotonic()
        timings = {}
        if started is not None and submitted is not None:
            timings = {
                "queue_s": started - submitted,
                "run_s": now - started,
                "total_s": now - submitted,
            }
        return TaskResult(
            job_id=task.job_id,
            lease_token=task.lease_token,
            status="failed",
            error={"type": error_type, "message": message, "traceback": traceback, "kind": kind},
            retryable=retryable,
            device=task.device,
            timings=timings,
        )

    def _deliver(self, result: TaskResult) -> None:
        try:
            self.on_result(result)
        except Exception:  # a broken callback must not kill the supervisor
            log.exception("on_result failed for job %s", result.job_id)
