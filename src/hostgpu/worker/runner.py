"""Run jobs in a pool of long-lived child processes.

:class:`ChildPool` keeps ``concurrency`` children started with ``spawn``; each runs one job at a
time and lives on, so imports and module-level caches (loaded models) stay warm between jobs.
One supervisor thread waits on every child's pipe and process sentinel with
:func:`multiprocessing.connection.wait`, with a timeout equal to the nearest job deadline, and
dispatches queued tasks to free children. A job past its timeout, a cancelled job, and a child
that dies are all handled by killing (or burying) the child and starting a replacement; the pool
and the parent process carry on.

The pool runs :class:`~hostgpu.jobs.Lease` records and reports each as an
:class:`~hostgpu.jobs.Outcome`: the same records the worker gets from and gives to the gateway.
``on_result`` is called from the supervisor thread, once per lease, except for the leases that
:meth:`ChildPool.stop` returns (those are handed back to the caller instead).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import ForkingPickler
from typing import IO, Any

from hostgpu.jobs import DEFAULT_MAX_RESULT_BYTES, JobError, Lease, Outcome, Payload
from hostgpu.worker import child as child_module
from hostgpu.worker.child import Done, Ready, Run
from hostgpu.worker.output import DEFAULT_JOB_OUTPUT_BYTES, OutputRelay

log = logging.getLogger("hostgpu.worker")

_STOP_CHILD_TIMEOUT = 5.0
_CRASH_LOG_LIMIT = 64 * 1024


class _Child:
    __slots__ = (
        "conn",
        "crash_log",
        "deadline",
        "dispatched_at",
        "kill_reason",
        "output",
        "pid",
        "proc",
        "state",
        "submitted_at",
        "task",
    )

    def __init__(
        self,
        proc: Any,
        conn: Connection,
        crash_log: IO[bytes] | None,
        output: OutputRelay | None,
    ) -> None:
        self.proc = proc
        self.conn = conn
        self.crash_log = crash_log
        self.output = output
        self.pid: int | None = proc.pid
        self.state = "starting"  # starting | idle | busy | broken | dead
        self.task: Lease | None = None
        self.submitted_at = 0.0
        self.dispatched_at = 0.0
        self.deadline = math.inf
        self.kill_reason: str | None = None  # "timeout" | "cancel" | "stop"

    def output_belongs_to(self, what: str) -> None:
        """Charge the child's output from now on to ``what`` (a job, or the child itself)."""
        if self.output is not None:
            self.output.switch(what)

    @property
    def between_jobs(self) -> str:
        return f"worker child {self.pid}"


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class ChildPool:
    """A fixed number of long-lived child processes that run :class:`Lease` objects."""

    def __init__(
        self,
        concurrency: int,
        on_result: Callable[[Outcome], None],
        *,
        preload: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        mp_context: str = "spawn",
        output_limit: int = DEFAULT_JOB_OUTPUT_BYTES,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._on_result = on_result
        self._preload = list(preload)
        self._env = dict(env) if env else None
        self._ctx = multiprocessing.get_context(mp_context)
        #: Bytes of each job's stdout and stderr copied to the worker's (see worker/output.py).
        self._output_limit = output_limit
        self._lock = threading.Lock()
        self._idle_cond = threading.Condition(self._lock)
        self._queue: deque[tuple[Lease, float]] = deque()
        self._children: list[_Child] = []
        self._by_obj: dict[Any, _Child] = {}
        self._wait_objs: list[Any] = []
        self._objs_dirty = True
        self._respawn_due: list[float] = []
        self._startup_failures = 0
        self._preload_warned: set[str] = set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_pending = False
        self._wait_until = math.inf
        self._started = False
        self._accepting = True
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._pending: list[Outcome] = []  # reports made outside the supervisor
        #: The first child's report of its imports and published functions.
        self.ready: Ready | None = None
        self._ready_event = threading.Event()
        self._undelivered = 0  # reports taken off the books but not yet given to on_result
        #: A result larger than this (as JSON) fails its job in the child: the gateway's
        #: limit, set once the worker has registered (a gateway that does not say: its default).
        self.max_result_bytes = DEFAULT_MAX_RESULT_BYTES

    # -- public API -------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the children; each imports the preload modules once."""
        with self._lock:
            if self._started:
                return
            self._started = True
            for _ in range(self.concurrency):
                self._spawn_locked()
            self._thread = threading.Thread(
                target=self._supervise, name="hostgpu-child-supervisor", daemon=True
            )
            self._thread.start()

    def wait_ready(self, timeout: float) -> Ready | None:
        """The first child's :class:`Ready` (imports done), or None if none came in time."""
        self._ready_event.wait(timeout)
        return self.ready

    def submit(self, task: Lease) -> None:
        """Queue a task; it runs as soon as a child is free. Never blocks."""
        self.submit_all([task])

    def submit_all(self, tasks: Sequence[Lease]) -> None:
        """Queue the tasks of one lease, all or (stopping) none; each starts as soon as a
        child is free. Never blocks."""
        now = time.monotonic()
        with self._lock:
            if not self._accepting:
                raise RuntimeError("the child pool is stopping and accepts no more tasks")
            self._queue.extend((task, now) for task in tasks)
            if self._started:
                deadline = self._dispatch_locked(now)
                if deadline < self._wait_until:
                    self._wake_locked()

    def free_slots(self) -> int:
        """How many more tasks would start right away: concurrency - (running + queued)."""
        with self._lock:
            if not self._accepting:
                return 0
            busy = sum(1 for c in self._children if c.task is not None)
            return max(0, self.concurrency - busy - len(self._queue))

    def executing(self) -> set[tuple[str, str]]:
        """(job id, lease token) of the leases a child is running now (not those waiting)."""
        with self._lock:
            return {(c.task.job_id, c.task.lease_token) for c in self._children if c.task}

    def long_running(self, longer_than: float) -> int:
        """How many children have been running their task for over ``longer_than`` seconds."""
        now = time.monotonic()
        with self._lock:
            return sum(
                1
                for c in self._children
                if c.task is not None and now - c.dispatched_at > longer_than
            )

    def take_waiting(self, longer_than: float) -> list[Lease]:
        """Take back the queued tasks that have waited over ``longer_than`` seconds for a
        child, while every child is running a task (they did not run: their caller is better
        served by another worker). The caller hands them back to the gateway. Not while a
        child is free or starting: it is about to take them."""
        now = time.monotonic()
        with self._lock:
            if not self._queue or any(c.task is None for c in self._children):
                return []
            taken = [task for task, at in self._queue if now - at > longer_than]
            if taken:
                self._queue = deque((t, at) for t, at in self._queue if now - at <= longer_than)
                self._notify_idle_locked()
            return taken

    def running(self) -> list[Lease]:
        """The tasks in a child or waiting for one."""
        with self._lock:
            tasks = [c.task for c in self._children if c.task is not None]
            tasks.extend(t for t, _ in self._queue)
            return tasks

    def cancel(self, job_id: str, lease_token: str | None = None) -> bool:
        """Drop a queued task or kill the child running it (that lease only, when
        ``lease_token`` is given); False when the pool does not have it.

        Either way ``on_result`` gets a failed result of kind "cancelled" (not retryable).
        """

        def mine(task: Lease) -> bool:
            return task.job_id == job_id and lease_token in (None, task.lease_token)

        report: Outcome | None = None
        with self._lock:
            for i, (task, submitted) in enumerate(self._queue):
                if mine(task):
                    del self._queue[i]
                    report = self._failure(
                        task,
                        "cancelled",
                        "JobCancelled",
                        "the job was cancelled before it started",
                        retryable=False,
                        submitted_at=submitted,
                    )
                    if self._thread is not None and not self._closing:
                        # on_result always runs on the supervisor thread while it runs
                        self._pending.append(report)
                        self._wake_locked()
                        report = None
                    self._notify_idle_locked()
                    break
            else:
                for c in self._children:
                    if c.task is not None and mine(c.task):
                        if c.kill_reason is None:
                            c.kill_reason = "cancel"
                            self._kill(c)
                            self._wake_locked()
                        return True
                return False
        self._deliver(report)
        return True

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until nothing is queued or running; False if ``timeout`` passed first."""
        with self._idle_cond:
            return self._idle_cond.wait_for(self._is_idle_locked, timeout)

    def stop(self, *, cold: bool = False, grace: float = 30.0) -> list[Lease]:
        """Stop the pool and return the tasks that did not finish (without reporting them).

        Warm (default): accept nothing more, hand back queued tasks, let running tasks finish
        for up to ``grace`` seconds, then stop the children. Cold, or past the grace: SIGKILL.
        """
        with self._lock:
            if self._stopped:
                return []
            self._stopped = True
            self._accepting = False
            unfinished = [t for t, _ in self._queue]
            self._queue.clear()
            if not cold and self._started:
                self._idle_cond.wait_for(
                    lambda: all(c.task is None for c in self._children), max(grace, 0.0)
                )
            for c in self._children:
                if c.task is not None:
                    if c.kill_reason != "cancel":  # a cancelled task is reported, not returned
                        unfinished.append(c.task)
                        c.task = None
                    c.kill_reason = c.kill_reason or "stop"
                    self._kill(c)
            if cold:
                for c in self._children:
                    self._kill(c)
            self._closing = True
            self._wake_locked()
            self._notify_idle_locked()
        if self._thread is not None:
            self._thread.join()
        self._shutdown_children(cold)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        return unfinished

    # -- children ---------------------------------------------------------------------------

    def _spawn_locked(self) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        # faulthandler in the child writes a crash's Python traceback into this unlinked file.
        crash_log: IO[bytes] | None = None
        with contextlib.suppress(OSError):
            crash_log = tempfile.TemporaryFile(prefix="hostgpu-child-")  # noqa: SIM115
        crash_fd = child_module.InheritedFd(crash_log.fileno()) if crash_log else None
        # The child's stdout and stderr: pipes read here, so a job's output is bounded.
        output: OutputRelay | None = None
        with contextlib.suppress(OSError):  # out of file descriptors: inherit ours, as before
            output = OutputRelay(self._output_limit)
        output_fds = (
            tuple(child_module.InheritedFd(fd) for fd in output.child_fds) if output else None
        )
        proc = self._ctx.Process(  # type: ignore[attr-defined]
            target=child_module.main,
            args=(child_conn, self._preload, self._env, crash_fd, output_fds),
            name="hostgpu-child",
            daemon=True,
        )
        try:
            proc.start()
        except BaseException:
            if output is not None:
                output.abandon()
            raise
        child_conn.close()
        c = _Child(proc, parent_conn, crash_log, output)
        if output is not None:
            output.start(c.between_jobs)
        self._children.append(c)
        self._by_obj[parent_conn] = c
        self._by_obj[proc.sentinel] = c
        self._objs_dirty = True
        return c

    def _kill(self, c: _Child) -> None:
        if c.state == "dead":
            return
        with contextlib.suppress(OSError, AttributeError, ValueError):
            c.proc.kill()

    def _bury_locked(self, c: _Child, now: float) -> Outcome | None:
        """The child's process ended: report its task, forget it, start a replacement."""
        previous_state = c.state
        c.state = "dead"
        self._by_obj.pop(c.conn, None)
        self._by_obj.pop(c.proc.sentinel, None)
        self._objs_dirty = True
        with contextlib.suppress(ValueError):
            self._children.remove(c)
        c.proc.join(timeout=1.0)
        code = c.proc.exitcode
        crash_text = self._read_crash_log(c)
        c.output_belongs_to(c.between_jobs)  # the end of its job's output
        with contextlib.suppress(OSError):
            c.conn.close()
        with contextlib.suppress(ValueError, AttributeError):
            c.proc.close()
        report: Outcome | None = None
        task = c.task
        c.task = None
        if task is not None:
            if c.kill_reason == "timeout":
                report = self._failure(
                    task,
                    "timeout",
                    "TimeoutError",
                    f"job exceeded its timeout of {float(task.timeout_s)} s and was killed",
                    retryable=True,
                    submitted_at=c.submitted_at,
                    dispatched_at=c.dispatched_at,
                    now=now,
                )
            elif c.kill_reason == "cancel":
                report = self._failure(
                    task,
                    "cancelled",
                    "JobCancelled",
                    "the job was cancelled while running; its worker child was killed",
                    retryable=False,
                    submitted_at=c.submitted_at,
                    dispatched_at=c.dispatched_at,
                    now=now,
                )
            else:
                report = self._failure(
                    task,
                    "crash",
                    "WorkerChildCrashed",
                    self._describe_exit(code) + " while running the job",
                    retryable=True,
                    submitted_at=c.submitted_at,
                    dispatched_at=c.dispatched_at,
                    now=now,
                    traceback=crash_text,
                )
        elif c.kill_reason is None and not self._closing:
            when = "while starting" if previous_state == "starting" else "while idle"
            log.warning("%s (pid %s) %s", self._describe_exit(code), c.pid, when)
        if not self._accepting and not self._queue:
            pass  # stopping: no replacement needed
        elif c.kill_reason in ("timeout", "cancel") or task is not None:
            self._spawn_locked()
        else:
            # Died without running anything we gave it (startup crash?): back off.
            self._startup_failures += 1
            delay = min(0.1 * 2 ** (self._startup_failures - 1), 10.0)
            self._respawn_due.append(now + delay)
        self._notify_idle_locked()
        return report

    @staticmethod
    def _describe_exit(code: int | None) -> str:
        if code is None:
            return "worker child died"
        if code < 0:
            name = _signal_name(-code)
            text = f"worker child died with {name}"
            if -code == signal.SIGKILL:
                text += " (killed from outside, for example by the out-of-memory killer)"
            return text
        return f"worker child exited with code {code}"

    def _read_crash_log(self, c: _Child) -> str:
        if not c.crash_log:
            return ""
        text = ""
        with contextlib.suppress(OSError, ValueError):
            c.crash_log.seek(0)
            text = c.crash_log.read(_CRASH_LOG_LIMIT).decode("utf-8", "replace")
        with contextlib.suppress(OSError):
            c.crash_log.close()
        c.crash_log = None
        return text

    def _shutdown_children(self, cold: bool) -> None:
        with self._lock:
            children = list(self._children)
            self._children.clear()
        if not cold:
            for c in children:
                with contextlib.suppress(OSError, ValueError):
                    c.conn.send(None)
        deadline = time.monotonic() + (0.0 if cold else _STOP_CHILD_TIMEOUT)
        for c in children:
            c.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if c.proc.exitcode is None:
                self._kill(c)
                c.proc.join(timeout=5.0)
            c.state = "dead"
            self._read_crash_log(c)
            with contextlib.suppress(OSError):
                c.conn.close()
            with contextlib.suppress(ValueError, AttributeError):
                c.proc.close()
        deadline = time.monotonic() + 1.0
        for c in children:
            if c.output is not None:  # the children's last lines, before the worker exits
                c.output.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- dispatch ---------------------------------------------------------------------------

    def _dispatch_locked(self, now: float) -> float:
        """Hand queued tasks to idle children; return the earliest new deadline."""
        earliest = math.inf
        if not self._queue:
            return earliest
        for c in self._children:
            if not self._queue:
                break
            if c.state != "idle":
                continue
            while self._queue:
                task, submitted = self._queue.popleft()
                payload = task.payload
                msg = Run(
                    task.job_id,
                    task.function,
                    payload.model_dump() if isinstance(payload, Payload) else payload,
                    task.serializer,
                    task.device.torch_device,
                    self.max_result_bytes,
                )
                try:
                    buf = ForkingPickler.dumps(msg)
                except Exception as exc:
                    report = self._failure(
                        task,
                        "serialization",
                        type(exc).__name__,
                        f"cannot send the job's payload to a worker child: {exc}",
                        retryable=False,
                        submitted_at=submitted,
                    )
                    self._pending.append(report)
                    self._wake_locked()
                    continue
                c.output_belongs_to(f"job {task.job_id}")
                try:
                    c.conn.send_bytes(buf)
                except OSError:
                    self._queue.appendleft((task, submitted))
                    c.state = "broken"  # its sentinel will report the death
                    break
                c.state = "busy"
                c.task = task
                c.submitted_at = submitted
                c.dispatched_at = now
                limit = float(task.timeout_s)
                c.deadline = now + limit if limit > 0 else math.inf  # <= 0: no limit
                earliest = min(earliest, c.deadline)
                break
        return earliest

    # -- supervisor -------------------------------------------------------------------------

    def _wake_locked(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _is_idle_locked(self) -> bool:
        return (
            not self._queue
            and not self._pending
            and self._undelivered == 0
            and all(c.task is None for c in self._children)
        )

    def _notify_idle_locked(self) -> None:
        if self._is_idle_locked() or self._stopped:
            self._idle_cond.notify_all()

    def _failure(
        self,
        task: Lease,
        kind: str,
        error_type: str,
        message: str,
        *,
        retryable: bool,
        submitted_at: float,
        dispatched_at: float = 0.0,
        now: float | None = None,
        traceback: str = "",
    ) -> Outcome:
        now = time.monotonic() if now is None else now
        timings = {"queue_s": (dispatched_at or now) - submitted_at, "total_s": now - submitted_at}
        if dispatched_at:
            timings["run_s"] = now - dispatched_at
            timings["import_s"] = 0.0
        return Outcome(
            job_id=task.job_id,
            lease_token=task.lease_token,
            status="failed",
            error=JobError(type=error_type, message=message, traceback=traceback, kind=kind),  # type: ignore[arg-type]
            retryable=retryable,
            device=task.device.torch_device,
            timings=timings,
        )

    def _deliver(self, report: Outcome | None) -> None:
        if report is None:
            return
        try:
            self._on_result(report)
        except Exception:
            log.exception("on_result raised for job %s", report.job_id)

    def _handle_message(self, c: _Child, msg: Any, now: float) -> Outcome | None:
        if isinstance(msg, Done):
            task = c.task
            if task is None or task.job_id != msg.job_id or c.kill_reason is not None:
                return None  # cancelled, timed out or handed back meanwhile
            c.task = None
            c.state = "idle"
            c.deadline = math.inf
            c.output_belongs_to(c.between_jobs)
            return Outcome(
                job_id=task.job_id,
                lease_token=task.lease_token,
                status="succeeded" if msg.ok else "failed",
                result=msg.result,
                error=JobError.model_validate(msg.error) if msg.error else None,
                retryable=bool(msg.retryable) if not msg.ok else True,
                device=task.device.torch_device,
                timings={
                    "queue_s": c.dispatched_at - c.submitted_at,
                    "import_s": msg.import_s,
                    "run_s": msg.run_s,
                    "total_s": now - c.submitted_at,
                },
            )
        if isinstance(msg, Ready):
            c.pid = msg.pid
            if c.state == "starting":
                c.state = "idle"
            self._startup_failures = 0
            if self.ready is None:
                self.ready = msg
                self._ready_event.set()
            for module, err in msg.errors.items():
                if module not in self._preload_warned:
                    self._preload_warned.add(module)
                    log.warning("worker child could not import %s: %s", module, err)
            return None
        log.warning("unexpected message from worker child %s: %r", c.pid, type(msg).__name__)
        return None

    def _supervise(self) -> None:
        """The supervisor thread: wait for a message, a death, a deadline, a respawn or a
        wake-up; take in what happened; start what is due; deliver the reports."""
        while True:
            with self._lock:
                if self._closing and not self._children_alive_with_task_locked():
                    break
                objs, timeout = self._next_wait_locked()
            ready = wait(objs, timeout)
            now = time.monotonic()
            with self._lock:
                reports = self._take_in_locked(ready, now)
                self._start_due_locked(now)
                self._undelivered = len(reports)
                if not reports:
                    self._notify_idle_locked()
            if reports:
                for report in reports:
                    self._deliver(report)
                with self._lock:
                    self._undelivered = 0
                    self._notify_idle_locked()
        with self._lock:
            leftover, self._pending = self._pending, []
        for report in leftover:
            self._deliver(report)

    def _next_wait_locked(self) -> tuple[list[Any], float | None]:
        """What to wait on (the wake-up pipe, each child's pipe and sentinel) and for how
        long: until the next deadline or respawn, or for ever."""
        if self._objs_dirty:
            self._wait_objs = [self._wake_r, *self._by_obj]
            self._objs_dirty = False
        until = min((c.deadline for c in self._children if c.kill_reason is None), default=math.inf)
        if self._respawn_due:
            until = min(until, *self._respawn_due)
        self._wait_until = until
        timeout = None if until == math.inf else max(0.0, until - time.monotonic())
        return self._wait_objs, timeout

    def _take_in_locked(self, ready: list[Any], now: float) -> list[Outcome]:
        """The reports of what woke the wait: children's messages and deaths (a dead child's
        last messages first), reports queued meanwhile, and deadlines that passed."""
        reports: list[Outcome] = []
        dead: list[_Child] = []
        for obj in ready:
            if obj == self._wake_r:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
                self._wake_pending = False
                continue
            c = self._by_obj.get(obj)
            if c is None or c.state == "dead":
                continue
            if obj is c.conn:
                try:
                    msg = c.conn.recv()
                except (EOFError, OSError):
                    if c not in dead:
                        dead.append(c)
                    continue
                report = self._handle_message(c, msg, now)
                if report is not None:
                    reports.append(report)
            elif c not in dead:
                dead.append(c)
        for c in dead:
            # A result may sit in the pipe ahead of the death: take it first.
            with contextlib.suppress(EOFError, OSError):
                while c.task is not None and c.conn.poll():
                    report = self._handle_message(c, c.conn.recv(), now)
                    if report is not None:
                        reports.append(report)
            report = self._bury_locked(c, now)
            if report is not None:
                reports.append(report)
        if self._pending:
            reports.extend(self._pending)
            self._pending.clear()
        self._check_deadlines_locked(now, reports)
        return reports

    def _start_due_locked(self, now: float) -> None:
        """Respawn the children whose backoff ended, and hand queued tasks to idle ones."""
        if self._closing:
            return
        due = [t for t in self._respawn_due if t <= now]
        if due:
            self._respawn_due = [t for t in self._respawn_due if t > now]
            for _ in due:
                self._spawn_locked()
        self._dispatch_locked(now)

    def _children_alive_with_task_locked(self) -> bool:
        # While closing, keep reaping children that stop() killed so their state settles.
        return any(c.kill_reason == "cancel" and c.task is not None for c in self._children)

    def _check_deadlines_locked(self, now: float, reports: list[Outcome]) -> None:
        for c in self._children:
            if c.task is None or c.kill_reason is not None or c.deadline > now:
                continue
            # It may have finished right at the deadline.
            with contextlib.suppress(EOFError, OSError):
                if c.conn.poll():
                    report = self._handle_message(c, c.conn.recv(), now)
                    if report is not None:
                        reports.append(report)
                    if c.task is None:
                        continue
            c.kill_reason = "timeout"
            self._kill(c)
