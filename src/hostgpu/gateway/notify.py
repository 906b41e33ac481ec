"""In-process wake-ups for long polls.

A waiter takes the topic's current event *before* it reads the store, so a
notification that lands between its read and its wait is never lost. Other gateway
processes do not see these events; long polls also re-read the store every
``poll_interval`` so a job enqueued through another gateway is still picked up.
"""

from __future__ import annotations

import asyncio


class Notifier:
    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, topic: str) -> asyncio.Event:
        event = self._events.get(topic)
        if event is None:
            event = self._events[topic] = asyncio.Event()
        return event

    def notify(self, topic: str) -> None:
        event = self._events.pop(topic, None)
        if event is not None:
            event.set()

    @staticmethod
    async def wait(event: asyncio.Event, timeout: float) -> bool:
        if timeout <= 0:
            return event.is_set()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True
