"""`hostgpu gateway`."""

from __future__ import annotations

import gc
import socket
from typing import TYPE_CHECKING, Annotated

import typer
import uvicorn

from hostgpu.cli.common import console
from hostgpu.settings import get_settings

if TYPE_CHECKING:  # the gateway's modules load only when it runs, not for every command
    from hostgpu.gateway.notify import Notifier


def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (HOSTGPU_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (HOSTGPU_PORT)")] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="sqlite:///PATH (default: HOSTGPU_HOME/hostgpu.db) or postgresql://…",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "warning",
) -> None:
    """Run the gateway: the /v1 API, the job store, /metrics and the dashboard."""
    from hostgpu.gateway import create_app
    from hostgpu.gateway.bootstrap import ensure_admin_token

    overrides = {
        k: v
        for k, v in {"host": host, "port": port, "database_url": database_url}.items()
        if v is not None
    }
    settings = get_settings().model_copy(update=overrides)
    app = create_app(settings)
    written = ensure_admin_token(app.state.store, settings)
    if written:
        console.print(f"First start: the admin token is in [bold]{written}[/bold] (0600).")
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}"
    if not settings.database_url:
        settings.gateway_url_path.write_text(url + "\n")
    console.print(f"gateway on {url}  store: {_safe(settings.resolved_database_url)}")
    # The cyclic collector cost a busy gateway a fifth of its CPU during a large .map: full
    # collections rescanned the whole heap, most of which (the imports, the app, its
    # schemas) lives as long as the process, and young ones ran every 700 allocations, while
    # nearly everything a request makes is freed by reference counting anyway. So: that heap
    # is frozen out of the collector's way, and young collections run 30 times less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
        # A worker channel's message is a report: the same limit as a request body.
        ws_max_size=settings.max_body_bytes,
    )
    _Server(config, app.state.notifier).run()


class _Server(uvicorn.Server):
    """uvicorn's server, which tells the gateway first when it begins to stop: its long
    polls (a caller's wait, a worker's lease) answer at once with what they have. Otherwise
    the shutdown waits for them for its grace period, then cancels them, and each caller
    gets a 500 instead of an answer."""

    def __init__(self, config: uvicorn.Config, notifier: Notifier) -> None:
        super().__init__(config)
        self.notifier = notifier

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.notifier.close()
        await super().shutdown(sockets)


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
