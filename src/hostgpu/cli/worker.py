"""`hostgpu worker` (run one) and `hostgpu worker install` (as a service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hostgpu.cli.common import (
    ChannelOpt,
    GatewayOpt,
    TokenFileOpt,
    console,
    err,
    install_service,
    native_report,
    token_from,
)
from hostgpu.errors import HostGPUError

app = typer.Typer(help="Run a native worker, or install it as a service.")
PlatformOpt = Annotated[
    str | None, typer.Option(help="darwin (launchd) or linux (systemd); default: this one")
]


def _labels(values: list[str]) -> dict[str, str]:
    labels = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"label {value!r} must look like key=value")
        labels[key] = val
    return labels


@app.callback(invoke_without_command=True)
def run(
    ctx: typer.Context,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    imports: Annotated[
        list[str],
        typer.Option("--import", help="Module whose functions this worker runs (repeatable)"),
    ] = [],  # noqa: B006 - typer needs a literal default
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Jobs at once")] = 1,
    name: Annotated[str, typer.Option(help="Worker name (default: host-pid)")] = "",
    label: Annotated[list[str], typer.Option(help="key=value label (repeatable)")] = [],  # noqa: B006
    grace: Annotated[float, typer.Option(help="Seconds a warm stop waits for jobs")] = 30.0,
    skip_broken_imports: Annotated[
        bool,
        typer.Option(
            "--skip-broken-imports",
            help="Start even when an --import module fails (without offering it)",
        ),
    ] = False,
    allow_container: Annotated[
        bool,
        typer.Option(
            "--allow-container", help="Run even inside a container on a Mac's VM (no Metal)"
        ),
    ] = False,
    channel: ChannelOpt = True,
) -> None:
    """Probe the accelerators, register with the gateway and run matching jobs.

    The first SIGTERM (or Ctrl-C) stops leasing and lets running jobs finish; the
    second kills them and hands them back to the gateway.
    """
    if ctx.invoked_subcommand is not None:
        return
    from hostgpu.worker.agent import WorkerAgent, WorkerConfig

    # Probed in a subprocess and cached: the worker's parent never imports torch.
    report = native_report(allow_container, "`hostgpu worker`")

    agent = WorkerAgent(
        WorkerConfig(
            gateway=gateway,
            token=token_from(token_file),
            modules=list(imports),
            concurrency=concurrency,
            name=name,
            labels=_labels(label),
            grace=grace,
            skip_broken_imports=skip_broken_imports,
            report=report,
            channel=channel,
        )
    )
    agent.install_signal_handlers()
    devices = ", ".join(f"{d.kind}:{d.name}" for d in agent.caps.devices)
    console.print(
        f"worker {agent.caps.name}: devices {devices}; modules {', '.join(agent.caps.modules)}"
    )
    raise typer.Exit(agent.run())


@app.command()
def install(
    gateway: GatewayOpt = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="The worker's token file (mode 0600; a worker-scoped token). Default: a new "
            "worker token, minted with your admin token, in HOSTGPU_HOME/worker-token",
        ),
    ] = None,
    imports: Annotated[
        list[str], typer.Option("--import", help="Module whose functions it runs (repeatable)")
    ] = [],  # noqa: B006
    concurrency: Annotated[int, typer.Option(min=1)] = 1,
    platform: PlatformOpt = None,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the file, write nothing (and mint no token)")
    ] = False,
) -> None:
    """Write a launchd agent (macOS) or systemd user unit (Linux) that runs this worker.

    The service reads its token from a 0600 file (HOSTGPU_TOKEN_FILE), never from the
    service file itself, and the token is worker-scoped: a service never runs as admin.
    """
    import socket
    import sys

    from hostgpu.client import Client
    from hostgpu.settings import get_settings, read_secret, write_secret
    from hostgpu.worker.service import service_file

    settings = get_settings()
    url = gateway or settings.resolved_gateway()
    if token_file is not None:
        token_file = token_file.expanduser().absolute()
        read_secret(token_file)  # private and not empty, or say how to fix it now
    else:
        token_file = settings.home_dir / "worker-token"
        if not print_only:
            name = f"worker service on {socket.gethostname()}"
            try:
                created = Client(url).create_token(name, "worker")
            except HostGPUError as exc:
                raise typer.BadParameter(
                    f"could not mint a worker token at {url} ({exc}): give --token-file with "
                    "a worker token (`hostgpu token create --scope worker > FILE` on a machine "
                    "with the admin token, then chmod 600 FILE)"
                ) from None
            write_secret(token_file, created.token)
            err.print(f"minted worker token {created.id} ({name!r}) into {token_file}")
    service = service_file(
        platform or sys.platform,
        gateway=url,
        token_file=token_file,
        modules=list(imports),
        concurrency=concurrency,
        home=Path.home(),
        hostgpu_home=settings.home_dir,
    )
    install_service(service, print_only)


@app.command()
def uninstall(
    gateway: GatewayOpt = None,
    platform: PlatformOpt = None,
    keep_token: Annotated[
        bool,
        typer.Option("--keep-token", help="Keep (and do not revoke) HOSTGPU_HOME/worker-token"),
    ] = False,
) -> None:
    """Stop and remove the service `hostgpu worker install` wrote, and revoke the worker token
    it minted (HOSTGPU_HOME/worker-token; needs your admin token)."""
    import sys

    from hostgpu.client import Client
    from hostgpu.settings import get_settings, read_secret
    from hostgpu.worker.service import manager, run_manager, service_path

    settings = get_settings()
    plat = platform or sys.platform
    path = service_path(plat, Path.home())
    ran = run_manager(manager(plat, path).unload)
    if ran is None:
        console.print(f"no {manager(plat, path).tool} here: nothing to stop")
    elif ran[0] != 0:
        console.print(f"stopping the service: {ran[1] or 'not loaded'}", highlight=False)
    else:
        console.print("service stopped")
    if path.exists():
        path.unlink()
        console.print(f"removed {path}")
    else:
        console.print(f"no service file at {path}")
    token_file = settings.home_dir / "worker-token"
    if keep_token or not token_file.exists():
        return
    url = gateway or settings.resolved_gateway()
    try:
        with Client(url, read_secret(token_file)) as worker_api:
            token_id = worker_api.whoami().id
        with Client(url) as admin_api:
            admin_api.revoke_token(token_id)
    except HostGPUError as exc:
        err.print(
            f"[yellow]could not revoke the worker token[/] ({exc}); `hostgpu token list` and "
            "`hostgpu token revoke ID` with an admin token do it",
            highlight=False,
        )
        raise typer.Exit(1) from None
    token_file.unlink()
    console.print(f"revoked worker token {token_id} and removed {token_file}")


@app.command()
def status(
    gateway: GatewayOpt = None,
    platform: PlatformOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """The worker service on this machine: its file, whether the service manager runs it, and
    what the gateway last heard from the workers on this host."""
    import socket
    import sys

    from hostgpu.capabilities import WorkerInfo
    from hostgpu.cli.common import print_json
    from hostgpu.client import Client
    from hostgpu.settings import get_settings
    from hostgpu.worker.service import manager, run_manager, service_path

    settings = get_settings()
    plat = platform or sys.platform
    path = service_path(plat, Path.home())
    ran = run_manager(manager(plat, path).state)
    running = None if ran is None else ran[0] == 0
    host = socket.gethostname()
    workers: list[WorkerInfo] = []
    gateway_error = None
    try:
        with Client(gateway or settings.resolved_gateway()) as api:
            workers = [w for w in api.workers() if w.capabilities.hostname == host]
    except HostGPUError as exc:
        gateway_error = str(exc)
    report = {
        "service_file": str(path),
        "installed": path.exists(),
        "manager": manager(plat, path).tool,
        "running": running,
        "token_file": str(settings.home_dir / "worker-token"),
        "token_file_present": (settings.home_dir / "worker-token").exists(),
        "workers_on_this_host": [
            {
                "id": w.id,
                "name": w.capabilities.name,
                "state": w.state,
                "alive": w.alive,
                "last_seen": w.last_seen,
                "devices": [d.kind for d in w.capabilities.devices],
            }
            for w in workers
        ],
        "gateway_error": gateway_error,
    }
    if as_json:
        print_json(report)
        return
    console.print(f"service file  {path} ({'present' if path.exists() else 'absent'})")
    state = {None: f"unknown (no {report['manager']} here)", True: "running", False: "not running"}
    console.print(f"service       {state[running]}")
    if gateway_error:
        console.print(f"gateway       [yellow]{gateway_error}[/]", highlight=False)
    for w in workers:
        console.print(
            f"worker        {w.capabilities.name} {w.state}{' (alive)' if w.alive else ''}; "
            f"devices {', '.join(d.kind for d in w.capabilities.devices)}",
            highlight=False,
        )
    if not workers and not gateway_error:
        console.print(f"worker        none from {host} registered at the gateway")
