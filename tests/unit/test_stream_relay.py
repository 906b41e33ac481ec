"""The gateway's stream relay, in-process: attempts, re-runs and abandoned readers."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from hostgpu.gateway.streams import RemoteStream, StreamHub
from hostgpu.inference.jobs import GenerateResult, StreamEvent

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
        RemoteStream(hub, JOB, _never, _never)  # the response never started
        gc.collect()
        assert hub.publish(event("11", "x"))

    asyncio.run(scenario())
