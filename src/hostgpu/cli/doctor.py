"""`hostgpu doctor`: what accelerators this process can use, and why the others are missing."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from hostgpu.cli.common import print_table
from hostgpu.devices import REQUIREMENTS, Report, probe, smoke_test
from hostgpu.devices import require as has_device
from hostgpu.stack.docker import DockerReport, check_docker


def _bytes(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / 2**30:.1f} GiB"


def _flag(value: bool | None) -> str:
    if value is None:
        return "-"
    return "yes" if value else "no"


def _render(console: Console, report: Report) -> None:
    console.print("[bold]hostgpu doctor[/bold]")
    console.print(f"  OS        {report.os} {report.os_version} ({report.machine})")
    if report.kernel and report.kernel != report.os_version:
        console.print(f"  Kernel    {report.kernel}")
    console.print(f"  Python    {report.python}")
    console.print(f"  CPU       {report.cpu_cores} cores, {_bytes(report.ram_bytes)} RAM")
    if report.container or report.vm:
        where = f"a {report.container} container" if report.container else "a container"
        vm = ""
        if report.vm_on_macos:
            vm = f" inside {report.vm}'s Linux VM on macOS (Metal is unreachable)"
        elif report.vm:
            host = "" if report.vm_host == "unknown" else f" on {report.vm_host}"
            vm = f" inside {report.vm}'s Linux VM{host}"
        console.print(f"  Container [yellow]{where}{vm}[/yellow]")
    else:
        console.print("  Container none (native)")
    if report.torch_version:
        console.print(
            f"  torch     {report.torch_version}:"
            f" cuda available {_flag(report.torch_cuda_available)}"
            f", mps built {_flag(report.torch_mps_built)}"
            f", mps available {_flag(report.torch_mps_available)}"
        )
    else:
        console.print("  torch     not installed")
    mlx = report.mlx_version or "not installed"
    if report.mlx_version:
        mlx += " (GPU backend)" if report.mlx_gpu else " (CPU backend only)"
    console.print(f"  MLX       {mlx}")
    if report.recorded_from:
        console.print(
            f"  [yellow]Recorded facts from {report.recorded_from} (HOSTGPU_PROBE_FACTS)[/]"
        )

    table = Table(title="Usable devices", title_justify="left")
    for column in ("device", "name", "memory", "compute capability"):
        table.add_column(column)
    for device in report.devices:
        table.add_row(
            device.torch_device if device.kind != "mlx" else "mlx",
            device.name,
            _bytes(device.memory_bytes),
            device.compute_capability or "-",
        )
    print_table(table, console)

    for missing in report.missing:
        console.print(f"[red]✗ {missing.kind}[/red]: {missing.reason}", highlight=False)
        console.print(f"  [green]fix[/green]: {missing.fix}", highlight=False)

    if report.smoke is not None:
        smoke = Table(title="Smoke test (512x512 float32 matmul)", title_justify="left")
        for column in ("device", "ms", "GFLOP/s", "vs CPU", "error"):
            smoke.add_column(column)
        for entry in report.smoke:
            vs_cpu = entry.get("vs_cpu")
            smoke.add_row(
                str(entry.get("device") or "-"),
                str(entry.get("ms", "-")),
                str(entry.get("gflops", "-")),
                f"{vs_cpu}x" if vs_cpu is not None else "-",
                str(entry.get("error") or ""),
            )
        print_table(smoke, console)


def _render_docker(console: Console, docker: DockerReport) -> None:
    """The docker section: one row per check, then a reason and a fix for each failure."""
    table = Table(title="Docker (for `hostgpu stack`)", title_justify="left")
    for column in ("check", "status", "found"):
        table.add_column(column)
    for check in docker.checks:
        status = (
            "[green]ok[/green]"
            if check.ok
            else ("[red]missing[/red]" if check.required else "[yellow]note[/yellow]")
        )
        table.add_row(check.name, status, check.detail or "-")
    print_table(table, console)
    for failed in docker.failures():
        if failed.reason:
            console.print(f"[red]✗ docker {failed.name}[/red]: {failed.reason}", highlight=False)
            console.print(f"  [green]fix[/green]: {failed.fix}", highlight=False)


def _requirement_failure(report: Report, what: str) -> str:
    kinds = ["cuda", "mps", "mlx"] if what == "gpu" else [what]
    lines = [f"--require {what}: no usable {'accelerator' if what == 'gpu' else what} here"]
    for missing in report.missing:
        if missing.kind in kinds:
            lines.append(f"  {missing.kind}: {missing.reason}")
            lines.append(f"  fix: {missing.fix}")
    return "\n".join(lines)


def doctor(
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    require: str | None = typer.Option(
        None, "--require", help="mps|cuda|mlx|gpu: exit 1 when absent."
    ),
    smoke: bool = typer.Option(False, "--smoke", help="Time a small matmul on each usable device."),
    docker: bool = typer.Option(
        True, "--docker/--no-docker", help="Also check Docker and Compose (for `hostgpu stack`)."
    ),
) -> None:
    """Show the accelerators this process can use, and why the others are missing."""
    wanted = require.strip().lower() if require is not None else None
    if wanted is not None and wanted not in REQUIREMENTS:
        typer.echo(
            f"unknown --require value {require!r}: use one of {', '.join(REQUIREMENTS)}",
            err=True,
        )
        raise typer.Exit(2)

    report = probe()
    if smoke:
        report.smoke = smoke_test(report.devices)

    # Composed next to the accelerator report, not inside it: the probe stays about devices.
    docker_report = check_docker() if docker else None
    if json_output:
        data = report.model_dump(mode="json")
        if docker_report is not None:
            data["docker"] = docker_report.model_dump(mode="json")
        typer.echo(json.dumps(data, indent=2))
    else:
        console = Console()
        _render(console, report)
        if docker_report is not None:
            _render_docker(console, docker_report)

    if wanted is not None and not has_device(report, wanted):
        typer.echo(_requirement_failure(report, wanted), err=True)
        raise typer.Exit(1)
