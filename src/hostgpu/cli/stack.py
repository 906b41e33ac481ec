"""`hostgpu stack up | down | status | logs`: services in containers, the worker native."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hostgpu.cli.common import JsonOpt, console, err, print_table
from hostgpu.settings import get_settings
from hostgpu.stack.hybrid import HybridStack, UpOptions, dump

app = typer.Typer(
    help="The hybrid stack: gateway, ChromaDB and copyparty in Docker; the GPU worker native.",
    no_args_is_help=True,
)

ComposeFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--compose-file",
        help="The stack's compose file (default: HOSTGPU_STACK_COMPOSE_FILE, else "
        "deploy/hybrid/compose.yaml of this checkout)",
    ),
]


def _stack(compose_file: Path | None = None, *, quiet: bool = False) -> HybridStack:
    say = (
        (lambda _m: None) if quiet else (lambda m: console.print(f"[dim]·[/] {m}", highlight=False))
    )
    return HybridStack(get_settings(), compose_file=compose_file, say=say)


@app.command()
def up(
    postgres: Annotated[
        bool, typer.Option("--postgres", help="Keep the queue in a PostgreSQL container")
    ] = False,
    uploads: Annotated[
        Path | None,
        typer.Option(help="Upload folder copyparty serves (default: HOSTGPU_HOME/uploads)"),
    ] = None,
    gateway_port: Annotated[
        int | None, typer.Option(envvar="HOSTGPU_STACK_GATEWAY_PORT", help="default 8765")
    ] = None,
    chroma_port: Annotated[
        int | None, typer.Option(envvar="HOSTGPU_STACK_CHROMA_PORT", help="default 8000")
    ] = None,
    uploads_port: Annotated[
        int | None, typer.Option(envvar="HOSTGPU_STACK_UPLOADS_PORT", help="default 3923")
    ] = None,
    imports: Annotated[
        list[str], typer.Option("--import", help="Module with your functions (repeatable)")
    ] = [],  # noqa: B006 - typer needs a literal default
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs the worker runs at once")] = 1,
    build: Annotated[
        bool,
        typer.Option(
            "--build/--no-build", help="Rebuild images (cached: seconds) or use existing ones"
        ),
    ] = True,
    allow_container: Annotated[
        bool,
        typer.Option(
            "--allow-container",
            help="Start even inside a container on a Mac's Linux VM (the worker gets no Metal)",
        ),
    ] = False,
    service: Annotated[
        bool,
        typer.Option(
            "--service",
            help="Run the worker as a systemd user unit / launchd agent (hostgpu-stack): "
            "restarted after a crash and at login, token in a 0600 file",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for healthy containers")] = 600,
    compose_file: ComposeFileOpt = None,
) -> None:
    """Check Docker, build and start the containers, wait for health, start the native worker."""
    ports = {
        name: port
        for name, port in (
            ("gateway", gateway_port),
            ("chroma", chroma_port),
            ("uploads", uploads_port),
        )
        if port is not None
    }
    stack = _stack(compose_file)
    state = stack.up(
        UpOptions(
            postgres=postgres,
            uploads=uploads,
            ports=ports,
            imports=tuple(imports),
            concurrency=concurrency,
            build=build,
            allow_container=allow_container,
            service=service,
            timeout=timeout,
        )
    )
    console.print(f"[green]gateway[/]  {state.gateway_url}   dashboard {state.gateway_url}/")
    console.print(f"[green]chroma[/]   {state.url('chroma')}")
    console.print(
        f"[green]uploads[/]  {state.url('uploads')}  (user hostgpu, password in "
        f"{stack.home / 'uploads-password'}) → {state.uploads}"
    )
    worker = state.worker
    console.print(
        f"[green]worker[/]   pid {worker.pid if worker else '-'}, log {stack.worker_log}"
        + (f"\n         service {worker.service}" if worker and worker.service else "")
    )
    console.print('next: hostgpu ingest FILE --wait · hostgpu search "…" · hostgpu stack status')


@app.command()
def down(
    volumes: Annotated[
        bool, typer.Option("--volumes", help="Also delete the data volumes (queue, vectors)")
    ] = False,
    grace: Annotated[float, typer.Option(help="Seconds the worker may finish running jobs")] = 30.0,
    compose_file: ComposeFileOpt = None,
) -> None:
    """Stop the worker warm (running jobs finish), then remove the containers."""
    _stack(compose_file).down(volumes=volumes, grace=grace)
    console.print("[green]stack down[/]: no worker, no containers left")


def _age(seconds: Any) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


@app.command()
def status(json_output: JsonOpt = False, compose_file: ComposeFileOpt = None) -> None:
    """One table: containers (state, health, port), the worker, the queue. Exit 1 if unhealthy."""
    report = _stack(compose_file, quiet=True).status()
    if json_output:
        typer.echo(dump(report))
        raise typer.Exit(0 if report["healthy"] else 1)
    title = f"hostgpu stack {report['project']}: " + (
        "[green]healthy[/]" if report["healthy"] else "[red]not healthy[/]"
    )
    table = Table("part", "state", "health", "where", "details", title=title, title_justify="left")
    for row in report["containers"]:
        state = row["state"]
        colour = "green" if state == "running" else "red"
        health = row["health"] or "-"
        hcolour = {"healthy": "green", "starting": "yellow"}.get(
            health, "red" if health != "-" else "white"
        )
        table.add_row(
            row["service"],
            f"[{colour}]{state}[/]",
            f"[{hcolour}]{health}[/]",
            ", ".join(p.split("->")[0] for p in row["ports"]) or "-",
            row.get("image") or "",
        )
    worker = report["worker"]
    wstate = "running" if worker["running"] else "stopped"
    alive = worker.get("alive")
    table.add_row(
        "worker (service)" if worker.get("service") else "worker (native)",
        f"[{'green' if worker['running'] else 'red'}]{wstate}[/] pid {worker['pid'] or '-'}",
        "[green]alive[/]" if alive else "[red]not seen[/]",
        "heartbeat " + _age(worker.get("last_heartbeat_s")),
        ", ".join(worker.get("devices") or []) or "-",
    )
    queue = report["queue"]
    table.add_row(
        "queue",
        ", ".join(f"{k} {v}" for k, v in (queue or {}).items() if v) or ("empty" if queue else "-"),
        "",
        report["gateway"],
        "postgres" if report["postgres"] else "sqlite",
    )
    print_table(table)
    console.print(f"uploads {report['uploads']['url']} → {report['uploads']['folder']}")
    if worker.get("service"):
        console.print(f"worker service {worker['service']}", highlight=False)
    if worker.get("service_failure"):
        err.print(f"[red]worker[/]: {worker['service_failure']}", highlight=False)
    if report["gateway_error"]:
        err.print(f"[red]gateway[/]: {report['gateway_error']}")
    if not report["healthy"]:
        raise typer.Exit(1)


@app.command()
def logs(
    service: Annotated[
        str | None,
        typer.Argument(help="gateway, chroma, copyparty, postgres or worker (default: all)"),
    ] = None,
    tail: Annotated[int, typer.Option(help="Lines per service")] = 200,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines")] = False,
    compose_file: ComposeFileOpt = None,
) -> None:
    """The containers' logs and the native worker's log file."""
    stack = _stack(compose_file, quiet=True)
    typer.echo(stack.logs(service, tail=tail), nl=False)
    if not follow:
        return
    state = stack.load_state()
    assert state is not None  # logs() raised otherwise
    if service == "worker":
        _follow(stack.worker_log)
    else:
        stack.compose(state).follow_logs([service] if service else [], tail=0)


def _follow(path: Path) -> None:
    """tail -f, until Ctrl-C."""
    with open(path, errors="replace") as handle:
        handle.seek(0, 2)
        try:
            while True:
                line = handle.readline()
                if line:
                    typer.echo(line, nl=False)
                else:
                    time.sleep(0.3)
        except KeyboardInterrupt:
            return
