"""The gateway's stream relay, in-process: attempts, re-runs and abandoned readers."""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any

from hostgpu.capabilities import Capabilities, Device
from hostgpu.gateway.notify import LeaseWaiter, Notifier, Runnable
from hostgpu.gateway.streams import RemoteStream, StreamHub
from hostgpu.inference.jobs import (
    INFERENCE_FUNCTION,
    MODEL_LABEL_VALUE,
    EngineState,
    GenerateResult,
    StreamEvent,
    function_options,
    model_label,
)
from hostgpu.requirements import Requirements

JOB = "a" * 32


def event(lease: str, text: str = "", **kw: Any) -> StreamEvent:
    return StreamEvent(job_id=JOB, lease_token=lease, text=text, tokens=1 if text else 0, **kw)


def result(text: str) -> GenerateResult:
    return GenerateResult(
        text=text, finish_reason="stop", prompt_tokens=3, completion_tokens=len(text.split())
    )


async def _never() -> Any:
    raise AssertionError("the store is not asked while events flow")


async def _read(hub: StreamHub) -> tuple[list[str], str]:
    stream = RemoteStream(hub, JOB, _never, _never)
    deltas = [d.text async for d in stream]
    completion = await stream.acompletion()
    return deltas, completion.text


def test_a_rerun_continues_where_the_reader_was_and_the_old_attempt_is_cut_off() -> None:
    async def scenario() -> None:
        hub = StreamHub()
        reader = asyncio.ensure_future(_read(hub))
        await asyncio.sleep(0)
        assert not hub.publish(event("11", "Hello "))
        assert not hub.publish(event("11", "wor"))
        # The first server lost its lease; the re-run starts from the beginning.
        assert not hub.publish(event("22", "Hello "))
        assert hub.publish(event("11", "ld!"))  # the old attempt is told to stop
        assert not hub.publish(event("22", "world!"))
        assert not hub.publish(event("22", result=result("Hello world!")))
        deltas, text = await reader
        assert "".join(deltas) == text == "Hello world!"
        assert deltas == ["Hello ", "wor", "ld!"]  # nothing sent twice

    asyncio.run(scenario())


def test_an_unread_stream_tells_its_server_to_stop() -> None:
    async def scenario() -> None:
        hub = StreamHub()
        cancelled = asyncio.Event()

        async def cancel_job() -> None:
            cancelled.set()

        RemoteStream(hub, JOB, _never, cancel_job)  # the response never started
        gc.collect()
        assert hub.publish(event("11", "x"))  # a server posting here is told at once
        # and the job is cancelled in the store, which a server posting its events to
        # another gateway hears from there
        await asyncio.wait_for(cancelled.wait(), 5)

    asyncio.run(scenario())


def _waiter(name: str, model: str = "smollm2") -> LeaseWaiter:
    caps = Capabilities(
        name=name,
        devices=[Device(kind="cpu", name="cpu")],
        labels={model_label(model): MODEL_LABEL_VALUE},
        functions={INFERENCE_FUNCTION: function_options(600)},
        serves="models",
        concurrency=2,
    )
    return LeaseWaiter(name, caps)


def _job(model: str = "smollm2") -> Runnable:
    labels = {model_label(model): MODEL_LABEL_VALUE}
    return Runnable(INFERENCE_FUNCTION, Requirements(labels=labels))


def test_a_request_goes_to_the_warm_server_and_waits_a_moment_for_it() -> None:
    async def scenario() -> None:
        hub, notifier = StreamHub(), Notifier()
        notifier.attach(asyncio.get_running_loop())
        notifier.preference = hub.preference
        notifier.hold_s = 0.1
        hub.engines["warm"] = [EngineState(model="smollm2", loaded=True, device="cpu")]
        hub.names["warm"], hub.capacity["warm"] = "warm", 2
        cold = _waiter("cold")
        notifier._lease_waiters.append(cold)
        # Both wait: the warm one is woken.
        warm = _waiter("warm")
        notifier._lease_waiters.append(warm)
        assert notifier.runnable([_job()]) == 1
        assert warm.event.is_set() and not cold.event.is_set()
        # The warm one is between polls (reporting): the request waits for it a moment...
        notifier.remove(warm)
        assert notifier.runnable([_job()]) == 0 and not cold.event.is_set()
        # ...and goes to the cold one if the warm one does not come back for it.
        await asyncio.sleep(0.3)
        assert cold.event.is_set()
        # A job of a model nobody has loaded goes to whoever waits, at once.
        cold.event.clear()
        assert notifier.runnable([_job("other")]) == 0  # the cold server does not serve it
        other = _waiter("other-server", "other")
        notifier._lease_waiters.append(other)
        assert notifier.runnable([_job("other")]) == 1 and other.event.is_set()
        # A server that left no longer holds requests back.
        hub.forget("warm")
        assert notifier.runnable([_job()]) == 1 and cold.event.is_set()

    asyncio.run(scenario())


def test_forwarded_pieces_fit_notify_and_read_back_whole() -> None:
    """A batch forwarded to another gateway: each piece under NOTIFY's limit whatever the text
    (multi-byte, escapes) or error body, and the reader there gets the same text and end."""
    from hostgpu.gateway.streams import wire_pieces
    from hostgpu.store.interface import MAX_BROADCAST_BYTES

    text = ('"é\\\n🙂' * 2000)[:7000]
    end = event("11", text, result=result(text), device="cpu")
    pieces = wire_pieces(end)
    assert len(pieces) == 7 and all(len(p.encode()) <= MAX_BROADCAST_BYTES for p in pieces)
    hub = StreamHub()
    stream = RemoteStream(hub, JOB, _never, _never)
    for piece in pieces:
        hub.heard(piece)
    deltas, completion = asyncio.run(_collect(stream))
    assert "".join(deltas) == text and completion.text == text
    assert completion.usage.completion_tokens == result(text).completion_tokens

    huge = {"error": {"message": "x" * 100_000, "type": "server_error"}}
    [failed] = wire_pieces(event("11", error=huge))
    assert len(failed.encode()) <= MAX_BROADCAST_BYTES
    assert StreamEvent.model_validate_json(failed).error == {
        "error": {"message": "x" * 500, "type": "server_error"}
    }
    # Not this gateway's reader: nothing is kept for it.
    StreamHub().heard(pieces[0])


async def _collect(stream: RemoteStream) -> tuple[list[str], Any]:
    deltas = [d.text async for d in stream]
    return deltas, await stream.acompletion()


def test_forwarded_events_before_the_reader_are_kept_briefly() -> None:
    """A forwarded event can beat the reader's relay (its request is resuming after the
    commit): the reader still gets the stream from its start; stale ones are dropped."""
    from hostgpu.gateway import streams

    hub = StreamHub()
    hub.heard(event("11", "Hello ").model_dump_json())
    hub.heard(event("11", "world", result=result("Hello world")).model_dump_json())
    stream = RemoteStream(hub, JOB, _never, _never)
    deltas, completion = asyncio.run(_collect(stream))
    assert "".join(deltas) == "Hello world" == completion.text

    other = "b" * 32
    hub.heard(event("11", "late").model_copy(update={"job_id": other}).model_dump_json())
    heard_at, events = hub._early[other]
    hub._early[other] = (heard_at - streams.EARLY_S - 1, events)  # as if 6 s ago
    assert hub.relay(other).queue.empty()


def test_forwarded_pieces_of_equal_text_stay_distinct() -> None:
    """PostgreSQL delivers identical payloads of one transaction once: two "\\n" tokens in a
    batch must not look the same on the wire (their offsets differ)."""
    from hostgpu.gateway.streams import wire_pieces

    first = wire_pieces(event("11", "\n").model_copy(update={"offset": 2}))
    second = wire_pieces(event("11", "\n").model_copy(update={"offset": 3}))
    assert first != second


def test_a_lost_forwarded_event_ends_from_the_stored_result() -> None:
    """An event that never arrived (offsets jump): the reader stops trusting the relay and
    finishes from the job's stored result, after the text it already sent."""
    from datetime import UTC, datetime

    from hostgpu.jobs import Job, JobState

    now = datetime.now(UTC)
    done = Job(
        id=JOB,
        function=INFERENCE_FUNCTION,
        requirements=Requirements(),
        state=JobState.succeeded,
        result=result("Hello world").model_dump(mode="json"),
        created_at=now,
        updated_at=now,
        run_after=now,
    )

    async def fetch() -> Any:
        return done

    hub = StreamHub()
    stream = RemoteStream(hub, JOB, fetch, _never)
    hub.heard(event("11", "Hello ").model_copy(update={"offset": 0}).model_dump_json())
    hub.heard(event("11", "ld").model_copy(update={"offset": 9}).model_dump_json())  # "wor" lost
    deltas, completion = asyncio.run(_collect(stream))
    assert "".join(deltas) == "Hello world" == completion.text
    assert deltas[0] == "Hello "


def test_a_gap_mends_when_the_server_sends_its_text_again_from_the_start() -> None:
    """Events lost with a channel: the server's catch-up (its text from offset 0) lets the
    reader go on live, with only what it lacks, and the store is not needed."""

    async def scenario() -> None:
        hub = StreamHub()
        reader = asyncio.ensure_future(_read(hub))
        await asyncio.sleep(0)
        hub.publish(event("11", "Hello ", offset=0))
        hub.publish(event("11", "ld", offset=9))  # "wor" went down with the channel
        hub.publish(event("11", "Hello world", offset=0))  # the catch-up
        hub.publish(event("11", "!", offset=11))
        hub.publish(event("11", result=result("Hello world!"), offset=12))
        deltas, text = await reader
        assert deltas == ["Hello ", "world", "!"] and text == "Hello world!"

    asyncio.run(scenario())


def test_a_recheck_forgets_only_the_forwarded_jobs_verifications() -> None:
    """A job finished on another gateway (``recheck``): the forwarded streams' servers are
    checked against the store again; other jobs' checks stand, and an ended stream's go."""
    hub = StreamHub()
    other = "b" * 32
    hub.forward(event("11", "Hello "))  # JOB's reader is on another gateway
    hub.verify(JOB, "w1", True)
    hub.verify(other, "w2", True)  # read here: not forwarded
    hub.recheck()
    assert hub.verified(JOB, "w1") is None and hub.verified(other, "w2") is True
    hub.verify(JOB, "w1", True)
    hub.forward(event("11", "world", result=result("Hello world")))
    assert hub.verified(JOB, "w1") is None and JOB not in hub.forwarded
    hub.close(other)
    assert hub.verified(other, "w2") is None


def test_another_gateways_enqueue_wakes_the_warm_server_it_describes() -> None:
    """A request stored through another gateway: its ``runnable`` event describes the job, so
    this gateway wakes one fitting server, the one it heard has the model warm (from the
    gateway that server posts to), not every idle server."""
    from hostgpu.gateway.streams import ServerEngines
    from hostgpu.store.sql import _runnable_topic

    async def scenario() -> None:
        hub, notifier = StreamHub(), Notifier()
        notifier.attach(asyncio.get_running_loop())
        notifier.preference = hub.preference
        # What the other gateway said of a server that posts to it, but polls here.
        hub.heard_engines(
            ServerEngines(
                worker="a1",
                name="warm",
                capacity=2,
                engines=[EngineState(model="smollm2", loaded=True, device="cpu")],
                said_at=100.0,
            ).model_dump_json()
        )
        cold, warm = _waiter("c0"), _waiter("a1")
        notifier._lease_waiters += [cold, warm]
        row = {
            "function": INFERENCE_FUNCTION,
            "gpu_kind": "any",
            "gpu_name": None,
            "min_memory_gb": None,
            "labels": '{"' + model_label("smollm2") + '":"' + MODEL_LABEL_VALUE + '"}',
            "fallback": None,
            "resolved": True,
        }
        topic = _runnable_topic([row])
        assert topic.startswith("runnable:[")
        notifier._dispatch(topic)
        assert warm.event.is_set() and not cold.event.is_set()
        # Without details (an older gateway, or many kinds of job): every idle waiter.
        notifier._dispatch("runnable")
        assert cold.event.is_set()
        # Older word (a stale refresh) does not undo newer; the other gateway said it left.
        gone = ServerEngines(worker="a1", name="", capacity=0, engines=[], said_at=99.0)
        hub.heard_engines(gone.model_dump_json())
        assert "a1" in hub.engines
        hub.heard_engines(gone.model_copy(update={"said_at": 101.0}).model_dump_json())
        assert "a1" not in hub.engines
        # A refresh sent before the "left" but heard after it does not bring it back.
        hub.heard_engines(
            ServerEngines(
                worker="a1",
                name="warm",
                capacity=2,
                engines=[EngineState(model="smollm2", loaded=True)],
                said_at=100.5,
            ).model_dump_json()
        )
        assert "a1" not in hub.engines
        # A server that posts here is described by this gateway; older word from others is not
        # taken, newer is (the server moved to another gateway).
        hub.note_engines("b2", "mine", 1, [EngineState(model="smollm2", loaded=False)])
        stale = ServerEngines(
            worker="b2", name="moved", capacity=9, engines=[EngineState(model="m", loaded=True)]
        )
        hub.heard_engines(stale.model_dump_json())
        assert hub.names["b2"] == "mine" and hub.local_servers() == ["b2"]
        hub.heard_engines(stale.model_copy(update={"said_at": 4e9}).model_dump_json())
        assert hub.names["b2"] == "moved" and hub.local_servers() == []
        # A server the store says is gone (it died without deregistering) is forgotten.
        hub.prune({"c0"})
        assert "b2" in hub.engines
        hub.prune({"b2"})
        assert "b2" not in hub.engines

    asyncio.run(scenario())


def test_a_described_runnable_event_is_read_strictly() -> None:
    """What another gateway's enqueue says is validated: anything odd, or a job whose CPU
    fallback opens at a time only its gateway knows, wakes every idle waiter instead."""
    from hostgpu.gateway.notify import _described

    req = {"gpu": "cuda", "labels": {}}
    [job] = _described(f'[["m:f",{json.dumps(req)},null,1]]') or []
    assert job.function == "m:f" and job.requirements.kind == "cuda" and job.fallback is None
    assert len(_described(f'[["m:f",{json.dumps(req)},null,5000]]') or []) == 1000
    for odd in (
        f'[["m:f",{json.dumps(req)},"cpu",1]]',  # a fallback: its grace is not known here
        f'[["m:f",{json.dumps(req)},null,1e999]]',
        f'[[["m"],{json.dumps(req)},null,1]]',
        "[" * 100_000,
        '[["m:f",{"gpu":"warp-drive"},null,1]]',
        "",
    ):
        assert _described(odd) is None, odd
