"""`hostgpu ray start` and `hostgpu ray status`: Ray nodes that advertise what the probe found."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.table import Table

from hostgpu.cli.common import JsonOpt, console, err, print_json, print_table

app = typer.Typer(
    help="Run hostgpu functions on a Ray cluster whose nodes advertise their real accelerators.",
    no_args_is_help=True,
)


def _gb(value: int | None) -> str:
    return f"{value / 2**30:.1f} GB" if value else "-"


@app.command(
    "start",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def start(
    ctx: typer.Context,
    head: Annotated[bool, typer.Option("--head", help="Start a new cluster's head node")] = False,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Join the cluster whose head is at HOST:PORT"),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="key=value node label (repeatable; also HOSTGPU_LABELS)"),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the `ray start` command and stop")
    ] = False,
) -> None:
    """Start a Ray node (`ray start`) that advertises this machine's probed accelerators.

    CUDA devices become `--num-gpus` with `accelerator_type:<type>` and `cuda:<name words>`
    resources; a Mac's Metal `mps` (and `mps_memory_gb`), MLX with a GPU backend `mlx`;
    labels become Ray node labels. Any other option (--port, --block, --num-cpus,
    --node-ip-address, --resources, …) goes to `ray start` as given.
    """
    from hostgpu.devices import cached_report
    from hostgpu.ray.node import plan_start
    from hostgpu.ray.resources import advertise, parse_labels
    from hostgpu.settings import get_settings

    settings = get_settings()
    labels = parse_labels(settings.labels)
    labels.update(parse_labels(label or []))
    report = cached_report(settings.home_dir / "probe-cache.json")
    advert = advertise(report, labels)
    plan = plan_start(
        advert, head=head, address=address, extra=list(ctx.args), environ=dict(os.environ)
    )

    table = Table(title="Ray resources for this node", title_justify="left")
    table.add_column("device")
    table.add_column("name")
    table.add_column("memory")
    table.add_column("Ray resources")
    for device in advert.devices:
        if device.kind == "cuda":
            ray = f"GPU (1 of {advert.num_gpus}), cuda:<name words>"
        elif device.kind in ("mps", "mlx"):
            ray = f"{device.kind}, {device.kind}_memory_gb, gpu"
        else:
            ray = "CPU (Ray's own)"
        table.add_row(
            device.torch_device if device.kind != "mlx" else "mlx",
            device.name,
            _gb(device.memory_bytes),
            ray,
        )
    print_table(table, err)
    if advert.in_mac_vm:
        why = advert.unavailable.get("mps", "Metal is unreachable from containers")
        fix = advert.fixes.get("mps", "")
        err.print(
            f"[yellow]This runs inside {advert.in_mac_vm}: the node advertises no accelerator."
            f"[/]\n  [red]✗ mps[/]: {why}" + (f"\n  [green]fix[/]: {fix}" if fix else ""),
            highlight=False,
        )
    else:
        for kind, reason in sorted(advert.unavailable.items()):
            err.print(f"  [dim]no {kind}: {reason}[/]", highlight=False)
    if report.recorded_from:
        err.print(
            f"[yellow]devices from recorded facts {report.recorded_from} (HOSTGPU_PROBE_FACTS)[/]"
        )
    for note in plan.notes:
        err.print(f"[yellow]note:[/] {note}")
    shown = ["ray", *plan.argv[3:]]
    if dry_run:
        console.print(" ".join(_quote(a) for a in shown), highlight=False, soft_wrap=True)
        return
    err.print("[dim]$ " + " ".join(_quote(a) for a in shown) + "[/]", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    # exec, not a child: signals (a service manager's SIGTERM, Ctrl-C on --block) reach
    # `ray start` itself, and the node's processes stay in the caller's process group.
    os.execve(plan.argv[0], plan.argv, plan.env)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


@app.command("status")
def status(
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            envvar="RAY_ADDRESS",
            help="The cluster: HOST:PORT of its head, or ray://HOST:10001 "
            "(default: the one running on this machine)",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The cluster's nodes with their hostgpu devices, labels, and why devices are missing."""
    from hostgpu.ray.node import cluster_status
    from hostgpu.ray.resources import devices_from_resources

    nodes = cluster_status(address)
    if as_json:
        print_json([n.as_dict() for n in nodes])
        return
    table = Table(title=f"{len(nodes)} Ray node(s)", title_justify="left")
    for column in ("node", "address", "CPUs", "hostgpu devices", "labels", "missing"):
        table.add_column(column)
    for node in sorted(nodes, key=lambda n: (not n.head, n.address)):
        if node.devices is not None:
            devices = [
                f"{d['kind']}: {d['name']}"
                + (f" ({d['memory_bytes'] / 2**30:.0f} GB)" if d.get("memory_bytes") else "")
                for d in node.devices
                if d["kind"] != "cpu"
            ] or ["cpu only"]
        else:
            devices = [*devices_from_resources(node.resources), "(not started by hostgpu)"]
        missing = [f"{k}: {v}" for k, v in sorted(node.unavailable.items())]
        table.add_row(
            node.node_id[:8] + (" (head)" if node.head else ""),
            node.address,
            f"{node.cpus:g}",
            "\n".join(devices),
            ",".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "-",
            "\n".join(missing) or "-",
        )
    print_table(table)
