"""What every command shares: the console, option types and the client."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from hostgpu.client import Client
from hostgpu.settings import read_secret

if TYPE_CHECKING:
    from hostgpu.worker.service import ServiceFile

console = Console()
err = Console(stderr=True)

GatewayOpt = Annotated[
    str | None,
    typer.Option(
        "--gateway", envvar="HOSTGPU_GATEWAY", help="Gateway URL (default: the local one)"
    ),
]
ChannelOpt = Annotated[
    bool,
    typer.Option(
        help="Take jobs over a WebSocket to the gateway (--no-channel: HTTP long polls, "
        "for a proxy that does not pass WebSockets; used anyway when the gateway has none)"
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


# Below this many characters a column, rich squeezes a table into empty cells.
MIN_COLUMN_WIDTH = 8


def print_table(table: Table, out: Console = console) -> None:
    """``table``, or where the terminal is too narrow for its columns, one ``header: value``
    line per cell and a blank line between rows, which stay readable at any width."""
    if out.width >= len(table.columns) * MIN_COLUMN_WIDTH + 1:
        out.print(table)
        return
    if table.title:
        out.print(table.title)
    for number, row in enumerate(zip(*(column.cells for column in table.columns), strict=True)):
        if number:
            out.print()
        for column, cell in zip(table.columns, row, strict=True):
            out.print(f"[bold]{column.header}[/]:", cell)


def token_from(token_file: Path | None) -> str | None:
    """The token in ``token_file`` (checked to be private), or None to use the settings."""
    return read_secret(token_file) if token_file is not None else None


def client(gateway: str | None, token_file: Path | None) -> Client:
    return Client(gateway, token_from(token_file))


def parse_duration(text: str, option: str | None = None) -> float:
    """'90', '90s', '15m', '12h', '7d' → seconds (finite, never negative); a usage error
    (exit 2) naming ``option`` otherwise, an empty value included."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        seconds = math.nan
    # float() takes "nan", "inf" and "-5" too: none of them is a duration.
    if not (math.isfinite(seconds) and seconds >= 0):
        raise typer.BadParameter(
            f"{text!r} is not a duration like 90s, 15m, 12h or 7d", param_hint=option
        )
    return seconds


def native_report(allow_container: bool, what: str) -> Any:
    """This host's (cached) accelerator probe; exits with doctor's reason when this process
    runs in a container on a Mac's VM, unless ``allow_container``."""
    from hostgpu.devices import cached_report
    from hostgpu.settings import get_settings

    report = cached_report(get_settings().home_dir / "probe-cache.json")
    if report.vm_on_macos and not allow_container:
        # doctor's rule: a container on a Mac runs in a Linux VM that cannot reach Metal, so
        # everything here would run on the CPU, 10-20x slower, without a word.
        err.print(
            f"[red]refusing to start[/]: this process runs in a {report.container or 'container'}"
            f" container inside {report.vm or 'a Linux VM'} on macOS, where Metal is "
            f"unreachable\n  fix: run {what} natively on the Mac (or `hostgpu stack up`, which "
            "does); --allow-container starts it here anyway, CPU only",
            highlight=False,
        )
        raise typer.Exit(2)
    return report


def install_service(service: ServiceFile, print_only: bool) -> None:
    """``--print``: the service file on stdout, nothing written; else write it and say how
    to start it."""
    from hostgpu.worker.service import write

    if print_only:
        sys.stdout.write(service.content)
        return
    write(service)
    console.print(f"wrote {service.path}\nstart it with:\n  {service.start_hint}")
