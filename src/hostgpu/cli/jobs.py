"""`hostgpu jobs|job|workers|cancel|submit|prune`: the queue, for people."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from hostgpu.cli.common import GatewayOpt, JsonOpt, TokenOpt, client, console, parse_duration
from hostgpu.jobs import Job, JobSpec, JobState, Requirements
from hostgpu.sdk import raise_for

STATE_STYLE = {
    "queued": "yellow",
    "leased": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%H:%M:%S") if value else ""


def list_jobs(
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 30,
    summary: Annotated[bool, typer.Option("--summary", help="Counts by state only")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs, newest first; queued ones say why they wait."""
    with client(gateway, token) as api:
        if summary:
            counts = api.summary()
            if as_json:
                console.print_json(data=counts)
                return
            table = Table("state", "jobs")
            for name, count in counts.items():
                table.add_row(f"[{STATE_STYLE[name]}]{name}[/]", str(count))
            table.add_row("[bold]total[/]", str(sum(counts.values())))
            console.print(table)
            return
        jobs = api.list_jobs(state=state, limit=limit)
    if as_json:
        console.print_json(data=[j.model_dump(mode="json") for j in jobs])
        return
    table = Table("id", "function", "needs", "state", "device", "tries", "created", "note")
    for job in jobs:
        note = job.waiting or ""
        if job.state is JobState.failed and job.error:
            note = f"{job.error.get('type')}: {job.error.get('message', '')}"[:80]
        device = (job.device or "") + (" (fallback)" if job.fallback_used else "")
        table.add_row(
            job.id[:12],
            job.function,
            job.requirements.describe(),
            f"[{STATE_STYLE[job.state.value]}]{job.state.value}[/]",
            device,
            str(job.attempts),
            _when(job.created_at),
            note,
        )
    console.print(table)


def show_job(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for it to finish")] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """One job: state, attempts (worker, device, outcome), result or error."""
    with client(gateway, token) as api:
        job = api.get(job_id, wait=wait)
    if as_json:
        console.print_json(data=job.model_dump(mode="json"))
        return
    _print_job(job)


def _print_job(job: Job) -> None:
    style = STATE_STYLE[job.state.value]
    console.print(f"[bold]{job.id}[/]  {job.function}  [{style}]{job.state.value}[/]")
    console.print(
        f"  needs {job.requirements.describe()}"
        + (f", fallback {job.fallback}" if job.fallback else "")
    )
    if job.waiting:
        console.print(f"  [yellow]{job.waiting}[/]")
    if job.device:
        console.print(f"  device {job.device}" + (" (CPU fallback)" if job.fallback_used else ""))
    for attempt in job.history or []:
        console.print(
            f"  attempt {attempt.attempt}: worker {attempt.worker_id} on {attempt.device}"
            f" → {attempt.outcome or 'running'}" + (f" ({attempt.error})" if attempt.error else "")
        )
    if job.timings:
        console.print("  timings " + ", ".join(f"{k}={v:.3f}s" for k, v in job.timings.items()))
    if job.state is JobState.succeeded:
        console.print("  result:", json.dumps(job.result)[:2000])
    elif job.error:
        console.print(f"  [red]{job.error.get('type')}: {job.error.get('message')}[/]")
        if job.error.get("traceback"):
            console.print(job.error["traceback"], markup=False, highlight=False)


def list_workers(
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
    alive: Annotated[bool, typer.Option("--alive", help="Only workers heartbeating now")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Registered workers, their devices, and whether they are alive."""
    with client(gateway, token) as api:
        workers = api.workers(alive=alive)
    if as_json:
        console.print_json(data=workers)
        return
    table = Table("id", "name", "devices", "modules", "state", "last seen")
    for w in workers:
        caps = w["capabilities"]
        devices = ", ".join(
            f"{d['kind']}:{d['name']}"
            + (f" {d['memory_bytes'] / 1024**3:.0f}GB" if d.get("memory_bytes") else "")
            for d in caps["devices"]
        )
        seen = time.strftime("%H:%M:%S", time.localtime(w["last_seen"]))
        state = f"[{'green' if w['alive'] else 'red'}]{w['state']}[/]"
        table.add_row(w["id"][:12], caps["name"], devices, ", ".join(caps["modules"]), state, seen)
    console.print(table)


def cancel(
    job_id: Annotated[str, typer.Argument(help="Job id")],
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
) -> None:
    """Cancel a job (a running one is killed on its worker)."""
    with client(gateway, token) as api:
        job = api.cancel(job_id)
    console.print(f"{job.id}: {job.state.value}")


def _parse_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word is a string


def submit(
    function: Annotated[str, typer.Argument(help="module:function to run")],
    arg: Annotated[
        list[str], typer.Option("--arg", help="Positional argument, JSON or a bare string")
    ] = [],  # noqa: B006
    kwarg: Annotated[
        list[str], typer.Option("--kwarg", help="name=value keyword argument (value as JSON)")
    ] = [],  # noqa: B006
    gpu: Annotated[str, typer.Option(help="mps | cuda | cuda:<name> | gpu | cpu | any")] = "any",
    memory: Annotated[float | None, typer.Option(help="Minimum accelerator memory, GB")] = None,
    fallback: Annotated[str | None, typer.Option(help="'cpu' to allow a CPU fallback")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds before the job is killed")] = 600.0,
    retries: Annotated[int, typer.Option(min=0)] = 2,
    priority: Annotated[int, typer.Option()] = 0,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait and print the result")
    ] = True,
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job by import path (the worker must run with --import MODULE)."""
    kwargs = {}
    for item in kwarg:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--kwarg {item!r} must look like name=value")
        kwargs[name] = _parse_arg(value)
    if fallback not in (None, "cpu"):
        raise typer.BadParameter("--fallback can only be 'cpu'")
    spec = JobSpec(
        function=function,
        payload={"args": [_parse_arg(a) for a in arg], "kwargs": kwargs},
        requirements=Requirements(gpu=gpu, min_memory_gb=memory),
        fallback=fallback,  # type: ignore[arg-type]
        timeout_s=timeout,
        max_retries=retries,
        priority=priority,
        idempotency_key=key,
    )
    with client(gateway, token) as api:
        job = api.submit(spec)
        if not wait:
            console.print(job.id)
            return
        while not job.state.terminal:
            job = api.get(job.id, wait=30)
            if job.waiting:
                console.print(f"[yellow]{job.waiting}[/]")
    if as_json:
        console.print_json(data=job.model_dump(mode="json"))
    else:
        _print_job(job)
    raise_for_exit(job)


def raise_for_exit(job: Job) -> None:
    try:
        raise_for(job)
    except Exception:
        raise typer.Exit(1) from None


def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Age like 7d, 12h, 30m")] = "7d",
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
) -> None:
    """Delete finished jobs older than the given age (admin token)."""
    seconds = parse_duration(older_than)
    with client(gateway, token) as api:
        deleted = api.prune(seconds)
    console.print(f"deleted {deleted} finished job(s) older than {older_than}")
