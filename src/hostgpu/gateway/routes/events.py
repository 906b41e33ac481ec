"""Server-sent events: the dashboard's cue to read again (scope: read).

A stream says *that* something changed (a job was submitted, leased, or finished through
this gateway), never what: the page then reads the figures it shows through the ordinary
routes, so a missed event costs nothing but a second of latency. Changes made through
another gateway on the same PostgreSQL are not heard here; the page's slower periodic
refresh covers them.

A stream ends after :data:`STREAM_S` seconds and the browser opens a new one, so a
gateway's graceful shutdown never waits on an idle dashboard for long.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterable

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from hostgpu.gateway.deps import GatewayDep, ReadToken

router = APIRouter(prefix="/v1", tags=["dashboard"])
TOPICS = ("enqueued", "leased", "finished")
STREAM_S = 55.0
#: Events are coalesced: a burst of 10,000 finishing jobs is a few events, not 10,000.
COALESCE_S = 0.5


@router.get("/events", response_class=EventSourceResponse)
async def events(request: Request, gw: GatewayDep, _: ReadToken) -> AsyncIterable[ServerSentEvent]:
    """A stream of ``change`` events (data: the topics that changed) for as long as 55 s."""
    deadline = time.monotonic() + STREAM_S
    # Hold each topic's event from before the first wait: a notification that lands while
    # this stream is busy (yielding, coalescing) sets it and is seen on the next round.
    events = {topic: gw.notifier.event(topic) for topic in TOPICS}
    yield ServerSentEvent(event="hello", data={"topics": list(TOPICS)}, retry=2000)
    while (remaining := deadline - time.monotonic()) > 0:
        if not any(e.is_set() for e in events.values()):
            waiters = [asyncio.ensure_future(e.wait()) for e in events.values()]
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=FIRST_COMPLETED)
            finally:
                for task in waiters:
                    task.cancel()
        if await request.is_disconnected():
            return
        changed = sorted(topic for topic, e in events.items() if e.is_set())
        if not changed:
            return  # the stream's time is up; the browser reconnects
        await asyncio.sleep(COALESCE_S)  # let the rest of a burst land in this event
        changed = sorted(topic for topic, e in events.items() if e.is_set())
        for topic in changed:
            events[topic] = gw.notifier.event(topic)
        yield ServerSentEvent(event="change", data={"topics": changed})
