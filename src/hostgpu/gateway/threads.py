"""The one way the gateway calls the synchronous store from the event loop (``run``), and
starts tasks that nobody awaits (``spawn``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: The store's threads. asyncio's executor, not anyio's ``to_thread``: a no-op job costs the
#: gateway about ten store calls, and anyio's per-call bookkeeping (cancel scopes, a capacity
#: limiter, backend lookups) was a tenth of the gateway's CPU per job. Long polls wait on the
#: event loop, not in these threads, so 40 (anyio's default) is plenty.
STORE_THREADS = ThreadPoolExecutor(max_workers=40, thread_name_prefix="hostgpu-store")


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call in the store's threads (the store is synchronous).

    As with anyio's ``run_sync``, a cancelled caller waits for the call to finish in its
    thread (a write commits or rolls back whole before the caller goes on), then sees the
    cancellation: a shutdown does not close the store under a running call."""
    call = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
    future = asyncio.get_running_loop().run_in_executor(STORE_THREADS, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


#: Tasks started without an owner that awaits them (asyncio keeps only weak references).
_background: set[asyncio.Task[None]] = set()


def spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run ``coroutine`` as a task of its own, kept alive until it ends."""
    task = asyncio.get_running_loop().create_task(coroutine)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task
