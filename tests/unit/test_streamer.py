"""The model server's streamer: one request per engine step's tokens, no wait for a lone one.

The gateway is replaced by a recorder of what each request would carry (the seam is the
client's ``stream`` call); the threads, queue and timing are the real ones.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from hostgpu.inference.jobs import StreamEvent
from hostgpu.worker.serving import LINGER_MAX_S, Streamer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[float, list[str]]] = []
        self.posted = threading.Event()

    def stream(self, worker_id: str, events: list[StreamEvent], states: Any) -> list[str]:
        self.batches.append((time.monotonic(), [e.job_id for e in events]))
        self.posted.set()
        return []

    def close(self) -> None:
        pass


def token(job: str) -> StreamEvent:
    return StreamEvent(job_id=job * 32, lease_token="1", text="x", tokens=1)


def streamer(streaming: int, step_s: float) -> tuple[Streamer, Recorder]:
    recorder = Recorder()
    sender = Streamer(lambda: recorder, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    sender.worker_id = "w"
    sender.streaming = lambda: streaming
    sender._step_s = step_s  # as after a few steps of this length
    sender.start()
    return sender, recorder


def test_a_steps_tokens_from_several_threads_go_in_one_request() -> None:
    sender, recorder = streamer(streaming=3, step_s=0.1)
    sender.send(token("a"))
    time.sleep(0.001)  # the other jobs' threads come a moment later
    sender.send(token("b"))
    sender.send(token("c"))
    sender.close()
    assert [jobs for _, jobs in recorder.batches] == [["a" * 32, "b" * 32, "c" * 32]]


def test_a_lone_stream_is_sent_at_once_and_a_missing_one_waited_for_briefly() -> None:
    sender, recorder = streamer(streaming=1, step_s=1.0)
    sent = time.monotonic()
    sender.send(token("a"))
    assert recorder.posted.wait(5)
    assert recorder.batches[0][0] - sent < LINGER_MAX_S / 2  # nobody else to wait for
    sender.close()

    sender, recorder = streamer(streaming=2, step_s=1.0)
    sent = time.monotonic()
    sender.send(token("a"))  # the other stream sends nothing this step
    assert recorder.posted.wait(5)
    waited = recorder.batches[0][0] - sent
    assert LINGER_MAX_S * 0.8 <= waited < 1.0  # the linger, then on without it
    sender.close()
