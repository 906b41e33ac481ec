"""Engines whose model one thread of their own drives (llama.cpp, mlx_lm).

Their libraries are not safe to call from many threads, so requests wait in an inbox that the
engine's thread empties; :meth:`ThreadedEngine._run` is that thread's loop. ``None`` in the
inbox tells it to stop (unload). After a failure in the loop the engine refuses new requests
until it is loaded again, rather than queueing them for a thread that is gone.
"""

from __future__ import annotations

import queue
import threading
from abc import abstractmethod
from typing import Any

from hostgpu.inference.engines.base import ActiveRequest, Engine
from hostgpu.inference.errors import EngineError


class ThreadedEngine(Engine):
    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self._inbox: queue.Queue[ActiveRequest | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @abstractmethod
    def _run(self) -> None:
        """The engine thread: take requests from the inbox until ``None``, generate."""

    def _start_thread(self) -> None:
        self._failure = None
        self._thread = threading.Thread(
            target=self._run, name=f"hostgpu-{self.spec.name}", daemon=True
        )
        self._thread.start()

    def _stop_thread(self) -> None:
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None
        self._fail_waiting(EngineError(f"{self.spec.name} was unloaded"))

    def _fail_waiting(self, error: EngineError) -> None:
        """Fail every request still in the inbox (the thread will not take them)."""
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request is not None:
                request.fail(error)
                self._forget(request)

    def _start(self, request: ActiveRequest) -> None:
        if self._failure is not None:
            raise EngineError(f"{self.spec.name} failed earlier ({self._failure}): reload it")
        self._inbox.put(request)
