"""What every command shares: the console, option types and the client."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from hostgpu.client import Client

console = Console()
err = Console(stderr=True)

GatewayOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway", envvar="HOSTGPU_GATEWAY", help="Gateway URL (default: the local one)"
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="HOSTGPU_TOKEN", help="API token (default: the local admin token)"
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def client(gateway: str | None, token: str | None) -> Client:
    return Client(gateway, token)


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d' → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h or 7d") from None
