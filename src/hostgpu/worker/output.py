"""A worker child's stdout and stderr, copied to the worker's own up to a limit per job.

A child's file descriptors 1 and 2 are pipes that the worker reads, one thread per child, so
the child never waits long on a full pipe. The first ``limit`` bytes a job writes (both
streams together, its subprocesses included) go on to the worker's stdout and stderr; the
rest is read and dropped, and one line in the worker's log says how much. Before, a child
wrote straight into the worker's stdout and stderr: a job that printed 100 MB put 100 MB in
the worker's log (and in the memory of whatever captured it).

Output is counted per *period*: a job, from the moment it is handed to the child until its
outcome comes back (or the child dies), and the time between jobs (imports, a thread a job
left running). The pool switches periods; before it does, what the child wrote so far is
read, so each job is charged with its own output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections import deque

log = logging.getLogger("hostgpu.worker")

#: Bytes of each job's output (stdout and stderr together) the worker's log keeps.
DEFAULT_JOB_OUTPUT_BYTES = 64 * 1024

_CHUNK = 64 * 1024
#: Reads per drain while the pool switches periods: a thread that prints without pause must
#: not hold the pool up. What is left is read (and charged to the next period) by the thread.
_MAX_DRAIN_READS = 64
#: Kept output waiting for the worker's own stdout or stderr (a stalled pipe or terminal);
#: beyond it, more is dropped and counted rather than held in memory.
_MAX_PENDING_BYTES = 4 * 1024 * 1024


class _Writer:
    """Writes the kept output to the worker's stdout and stderr from a thread of its own:
    a stalled terminal or pipe (``hostgpu worker | less``, a paused journald) then holds
    up only this thread, never a relay's reader or the pool that switches periods."""

    def __init__(self) -> None:
        self._pending: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._dropped = 0
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def put(self, target: int, data: bytes) -> None:
        with self._ready:
            if self._bytes + len(data) > _MAX_PENDING_BYTES:
                self._dropped += len(data)
                return
            self._pending.append((target, data))
            self._bytes += len(data)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="hostgpu-output-writer", daemon=True
                )
                self._thread.start()
            self._ready.notify()

    def flush(self, timeout: float) -> bool:
        """Wait until what was put is written (for a child's last words); False on timeout."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._pending, timeout)

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._pending))
                target, data = self._pending[0]
            view = memoryview(data)
            with contextlib.suppress(OSError):  # a worker without stdout or stderr
                while view:
                    view = view[os.write(target, view) :]
            with self._ready:
                self._pending.popleft()
                self._bytes -= len(data)
                dropped, self._dropped = self._dropped, 0
                self._ready.notify_all()
            if dropped:
                log.warning(
                    "the worker's output was stalled: %s bytes of job output dropped",
                    f"{dropped:,}",
                )


_writer = _Writer()


def flush(timeout: float = 5.0) -> bool:
    """Wait until the kept output of every child is written; False on timeout."""
    return _writer.flush(timeout)


class OutputRelay:
    """Reads one child's stdout and stderr pipes; see the module docstring."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        out_r, out_w = os.pipe()
        try:
            err_r, err_w = os.pipe()
        except OSError:  # out of file descriptors: leave none behind
            os.close(out_r)
            os.close(out_w)
            raise
        #: The write ends, for the child to make its fds 1 and 2 (closed here by ``start``).
        self.child_fds: tuple[int, int] = (out_w, err_w)
        self._targets = {out_r: 1, err_r: 2}  # read end -> the worker's own fd
        #: Which pipes have something to read now (``switch`` asks it without waiting: one
        #: system call when, as for most jobs, there is nothing).
        self._ready = select.poll()
        for fd in self._targets:
            os.set_blocking(fd, False)
            self._ready.register(fd, select.POLLIN)
        self._lock = threading.Lock()
        self._label = ""
        self._total = 0
        self._kept = 0
        self._thread = threading.Thread(target=self._run, name="hostgpu-child-output", daemon=True)

    def start(self, label: str) -> None:
        """The child has started with the write ends: close ours and read, for ``label``."""
        self._label = label
        for fd in self.child_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the child's last output, once it has ended."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        _writer.flush(timeout)

    def abandon(self) -> None:
        """The child never started: close every end."""
        for fd in (*self.child_fds, *self._targets):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._targets.clear()

    def switch(self, label: str) -> None:
        """End the current period (reading what the child wrote so far) and start ``label``."""
        with self._lock:
            for fd, _ in self._ready.poll(0):
                if fd in self._targets:
                    self._read_locked(fd, _MAX_DRAIN_READS, close_at_end=False)
            self._report_locked()
            self._label = label
            self._total = 0
            self._kept = 0

    def _run(self) -> None:
        poller = select.poll()
        for fd in self._targets:
            poller.register(fd, select.POLLIN)
        while self._targets:
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - retried by Python since 3.5
                continue
            with self._lock:
                for fd, _ in events:
                    if fd in self._targets and not self._read_locked(fd, 4, close_at_end=True):
                        poller.unregister(fd)
        with self._lock:
            self._report_locked()

    def _read_locked(self, fd: int, reads: int, *, close_at_end: bool) -> bool:
        """Read up to ``reads`` chunks of ``fd``; False at its end (closed with
        ``close_at_end``: only the reading thread closes, so no fd it polls is ever reused)."""
        for _ in range(reads):
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                return True
            except OSError:
                data = b""
            if not data:
                if close_at_end:
                    del self._targets[fd]
                    self._ready.unregister(fd)
                    with contextlib.suppress(OSError):
                        os.close(fd)
                return False
            self._take_locked(self._targets[fd], data)
        return True

    def _take_locked(self, target: int, data: bytes) -> None:
        room = self.limit - self._kept
        self._total += len(data)
        if room <= 0:
            return
        kept = data[:room]
        self._kept += len(kept)
        if len(kept) < len(data) and not kept.endswith(b"\n"):
            kept += b"\n"  # the line saying what was left out starts on a line of its own
        _writer.put(target, kept)

    def _report_locked(self) -> None:
        left_out = self._total - self._kept
        if left_out > 0:
            log.warning(
                "%s wrote %s bytes to stdout and stderr: the first %s are in this log, "
                "%s bytes were left out (HOSTGPU_JOB_OUTPUT_BYTES)",
                self._label,
                f"{self._total:,}",
                f"{self._kept:,}",
                f"{left_out:,}",
            )
        self._total = self._kept = 0  # said once, even if the period ends twice (a death)
