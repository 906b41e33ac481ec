"""The Celery app for the peer benchmark: Redis broker and Redis result backend (db 5)."""

from __future__ import annotations

from typing import Any

from celery import Celery
from common import redis_url

app = Celery("celery_tasks", broker=redis_url(5), backend=redis_url(5))
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(x: Any = None) -> Any:
    """Return the argument, like ``hostgpu.builtin.noop``."""
    return x
