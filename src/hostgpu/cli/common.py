"""What every command shares: the console, option types and the client."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from hostgpu.client import Client
from hostgpu.settings import read_secret

console = Console()
err = Console(stderr=True)

GatewayOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway", envvar="HOSTGPU_GATEWAY", help="Gateway URL (default: the local one)"
    ),
]
# Never a --token flag: a command line is visible to every user in `ps`.
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API token (mode 0600). Default: HOSTGPU_TOKEN, else "
        "HOSTGPU_TOKEN_FILE, else the local admin token in HOSTGPU_HOME (the SDK's order)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


def print_json(data: Any) -> None:
    """JSON for pipes and files: plain, never wrapped or coloured, whatever the terminal width."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def token_from(token_file: Path | None) -> str | None:
    """The token in ``token_file`` (checked to be private), or None to use the settings."""
    return read_secret(token_file) if token_file is not None else None


def client(gateway: str | None, token_file: Path | None) -> Client:
    return Client(gateway, token_from(token_file))


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
