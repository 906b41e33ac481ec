"""A gateway's cache of workers' capabilities never keeps what a registration replaced.

The store is a stand-in whose read blocks until the test lets it go, so a registration can
be heard while a read is in flight (the window is milliseconds wide on a real gateway)."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from hostgpu.capabilities import Capabilities, Device
from hostgpu.gateway.notify import Notifier
from hostgpu.gateway.protocol import worker_capabilities

OLD = Capabilities(name="old", devices=[Device(kind="cpu", name="cpu")])
NEW = Capabilities(name="new", devices=[Device(kind="cpu", name="cpu")])


class SlowStore:
    """``get_worker`` returns what was stored when it was called, once it is let go."""

    def __init__(self) -> None:
        self.caps = OLD
        self.reading = threading.Event()
        self.go = threading.Event()

    def get_worker(self, worker_id: str) -> SimpleNamespace:
        read = self.caps
        self.reading.set()
        assert self.go.wait(10)
        return SimpleNamespace(capabilities=read)


def test_a_read_overtaken_by_a_registration_is_not_cached() -> None:
    async def scenario() -> None:
        notifier = Notifier()
        notifier.attach(asyncio.get_running_loop())
        request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(notifier=notifier)))
        store = SlowStore()
        reader = asyncio.create_task(worker_capabilities(request, store, "w"))  # type: ignore[arg-type]
        await asyncio.to_thread(store.reading.wait, 10)
        # The worker registers again through another gateway; this one hears it meanwhile.
        store.caps = NEW
        notifier.heard_from_store("worker:w")
        await asyncio.sleep(0.05)
        store.go.set()
        assert (await reader).name == "old"  # this poll used what it read, once
        assert "w" not in notifier.worker_caps  # and the next one reads again
        assert (await worker_capabilities(request, store, "w")).name == "new"  # type: ignore[arg-type]
        assert notifier.worker_caps["w"].name == "new"

    asyncio.run(scenario())


def test_a_resync_drops_every_entry_and_a_registration_ends_draining() -> None:
    async def scenario() -> None:
        notifier = Notifier()
        notifier.attach(asyncio.get_running_loop())
        notifier.worker_caps.update(a=OLD, b=OLD)
        notifier.drain("a")
        before = notifier.caps_version("b")
        notifier.heard_from_store("resync")
        await asyncio.sleep(0.05)
        assert notifier.worker_caps == {}
        notifier.worker_changed("a", NEW)  # it came back after draining
        assert notifier.worker_caps == {"a": NEW}
        assert "a" not in notifier.draining
        assert notifier.caps_version("b") != before

    asyncio.run(scenario())
