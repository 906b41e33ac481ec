"""The model server's streamer: one request per engine step's tokens, no wait for a lone one.

The gateway is replaced by a recorder of what each request would carry (the seam is the
client's ``stream`` call); the threads, queue and timing are the real ones.
"""

from __future__ import annotations

import threading
import time

from hostgpu.api import StreamBatch
from hostgpu.inference.jobs import StreamEvent
from hostgpu.worker.serving import LINGER_MAX_S, Streamer


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[float, list[str]]] = []
        self.posted = threading.Event()

    def stream(self, worker_id: str, batch: StreamBatch) -> list[str]:
        events = batch.events
        self.batches.append((time.monotonic(), [e.job_id for e in events]))
        self.posted.set()
        return []

    def close(self) -> None:
        pass


def token(job: str) -> StreamEvent:
    return StreamEvent(job_id=job * 32, lease_token="1", text="x", tokens=1)


def streamer(decoding: int, step_s: float) -> tuple[Streamer, Recorder]:
    recorder = Recorder()
    sender = Streamer(lambda: recorder, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    sender.worker_id = "w"
    sender.decoding = lambda: {job * 32 for job in "abcdefgh"[:decoding]}
    sender._step_s = step_s  # as after a few steps of this length
    sender.start()
    return sender, recorder


def test_a_steps_tokens_from_several_threads_go_in_one_request() -> None:
    sender, recorder = streamer(decoding=3, step_s=0.1)
    sender.send(token("a"))
    time.sleep(0.001)  # the other jobs' threads come a moment later
    sender.send(token("b"))
    sender.send(token("c"))
    sender.close()
    assert [jobs for _, jobs in recorder.batches] == [["a" * 32, "b" * 32, "c" * 32]]


def test_a_lone_stream_is_sent_at_once_and_a_missing_one_waited_for_briefly() -> None:
    sender, recorder = streamer(decoding=1, step_s=1.0)
    sent = time.monotonic()
    sender.send(token("a"))
    assert recorder.posted.wait(5)
    assert recorder.batches[0][0] - sent < LINGER_MAX_S / 2  # nobody else to wait for
    sender.close()

    sender, recorder = streamer(decoding=2, step_s=1.0)
    sent = time.monotonic()
    sender.send(token("a"))  # the other stream sends nothing this step
    assert recorder.posted.wait(5)
    waited = recorder.batches[0][0] - sent
    assert LINGER_MAX_S * 0.8 <= waited < 1.0  # the linger, then on without it
    sender.close()


def test_a_stream_heard_from_this_step_is_not_awaited_again() -> None:
    """A step's events can straddle a request to the gateway: the second batch must not
    wait for the job whose token went in the first (its next comes a whole step later)."""
    sender, recorder = streamer(decoding=2, step_s=1.0)
    sender.send(token("a"))  # b's token is late: a goes alone, after the linger
    assert recorder.posted.wait(5)
    recorder.posted.clear()
    sent = time.monotonic()
    sender.send(token("b"))
    assert recorder.posted.wait(5)
    assert recorder.batches[1][0] - sent < LINGER_MAX_S / 2  # a has sent this step's token
    sender.close()
    assert [jobs for _, jobs in recorder.batches] == [["a" * 32], ["b" * 32]]


def test_the_linger_awaits_only_streams_past_their_first_token() -> None:
    """A stream in its prefill (or queued behind a serial engine) yields nothing this step:
    counting it made every first token of a burst of long prompts wait the whole linger."""
    from hostgpu.inference.engines import GenerationStream, SamplingParams
    from hostgpu.inference.engines.base import ActiveRequest
    from hostgpu.worker.serving import EnginePool, _Running

    def stream(tokens: int) -> GenerationStream:
        request = ActiveRequest(
            f"r{tokens}", [1, 2, 3], SamplingParams(), 2, frozenset(), lambda ids: "x" * len(ids)
        )
        for _ in range(tokens):
            request.emit(7)
        return GenerationStream(request)

    sender = Streamer(lambda: Recorder(), on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    pool = EnginePool({}, "cpu", lambda _: None, sender)
    assert sender.decoding() == set()
    for n, produced in enumerate([0, 0, 1, 2]):  # in prefill, in prefill, decoding, finished
        pool._running[(str(n), "1")] = _Running(lease=None, model="m", stream=stream(produced))  # type: ignore[arg-type]
    pool._running[("4", "1")] = _Running(lease=None, model="m")  # type: ignore[arg-type]
    assert sender.decoding() == {"2"}


def test_a_backlog_over_a_batchs_limit_goes_in_several() -> None:
    """A gateway slow to answer leaves more events than one batch may carry: all still go."""
    from hostgpu.api import MAX_STREAM_EVENTS

    recorder = Recorder()
    sender = Streamer(lambda: recorder, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    sender.worker_id = "w"
    events = [token("a")] * (MAX_STREAM_EVENTS + 2)
    sender._post(recorder, events, None)  # type: ignore[arg-type]
    assert [len(jobs) for _, jobs in recorder.batches] == [MAX_STREAM_EVENTS, 2]
    assert sender.sent_events == MAX_STREAM_EVENTS + 2


def test_after_its_channel_is_gone_each_stream_is_sent_again_from_its_start() -> None:
    """Batches written to a channel the gateway was closing may be lost: once the batches go
    another way, every stream's text from its start follows (readers take what they lack)."""
    sent: list[list[StreamEvent]] = []

    class Http(Recorder):
        def stream(self, worker_id: str, batch: StreamBatch) -> list[str]:
            sent.append(batch.events)
            return []

    http = Http()
    sender = Streamer(lambda: http, on_cancel=lambda _: None)  # type: ignore[arg-type,return-value]
    sender.worker_id = "w"
    channels = iter([1, None, None, 2])  # channel 1, then HTTP (twice), then a new channel
    on_channel: list[StreamBatch] = []

    def send_on_channel(batch: StreamBatch) -> int | None:
        number = next(channels)
        if number is not None:
            on_channel.append(batch)
        return number

    whole = StreamEvent(job_id="a" * 32, lease_token="1", text="xxx", offset=0)
    sender.on_channel = send_on_channel
    sender.catch_up = lambda: [whole]
    sender._post(http, [token("a")], None)  # type: ignore[arg-type]
    assert sent == [] and len(on_channel) == 1
    sender._post(http, [token("a")], None)  # type: ignore[arg-type]  # the channel is gone
    assert sent == [[token("a")], [whole]]
    sender._post(http, [token("a")], None)  # type: ignore[arg-type]  # from HTTP: nothing lost
    assert len(sent) == 2 and len(on_channel) == 2
