"""`hostgpu jobs|job|workers|cancel|submit|prune`: the queue, for people."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from hostgpu.api import MAX_WAIT_S
from hostgpu.cli.common import (
    GatewayOpt,
    JsonOpt,
    TokenFileOpt,
    client,
    console,
    err,
    parse_duration,
    print_json,
    print_table,
)
from hostgpu.jobs import Job, JobSpec, JobState, Payload
from hostgpu.sdk import raise_for

STATE_STYLE = {
    "queued": "yellow",
    "leased": "cyan",
    "running": "blue",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}

#: A job named on the command line: its id, or a prefix long enough to be unique.
JobIdArg = Annotated[str, typer.Argument(help="Job id, or a unique prefix (4+ characters)")]


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%H:%M:%S") if value else ""


def list_jobs(
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    state: Annotated[JobState | None, typer.Option(help="Only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 30,
    summary: Annotated[bool, typer.Option("--summary", help="Counts by state only")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Recent jobs, newest first; queued ones say why they wait."""
    with client(gateway, token_file) as api:
        if summary:
            counts = api.summary()
            if as_json:
                print_json(counts.counts)
                return
            table = Table("state", "jobs")
            for name, count in counts.counts.items():
                table.add_row(f"[{STATE_STYLE[name]}]{name}[/]", str(count))
            table.add_row("[bold]total[/]", str(counts.total))
            print_table(table)
            return
        jobs = api.list_jobs(state=state, limit=limit).jobs
    if as_json:
        print_json([j.model_dump(mode="json") for j in jobs])
        return
    table = Table("id", "function", "needs", "state", "device", "tries", "created", "note")
    for job in jobs:
        note = job.waiting or ""
        if job.state is JobState.failed and job.error:
            note = job.error.summary(80)
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
    print_table(table)


def show_job(
    job_id: JobIdArg,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    wait: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for it to finish (any number)")
    ] = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """One job: state, attempts (worker, device, outcome), result or error.

    Exit status: 0 succeeded or still running, 1 failed or cancelled, 2 --wait timed out.
    """
    with client(gateway, token_file) as api:
        deadline = time.monotonic() + wait
        job = api.get(job_id, wait=min(wait, MAX_WAIT_S))
        # The gateway holds a long poll for at most MAX_WAIT_S: ask again until the deadline.
        while not job.state.terminal and (left := deadline - time.monotonic()) > 0:
            job = api.get(job.id, wait=min(left, MAX_WAIT_S))
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        _print_job(job)
    raise_for_exit(job, waited=wait > 0)


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
        console.print(f"  [red]{job.error.summary()}[/]", highlight=False)
        if job.error.traceback:
            console.print(job.error.traceback, markup=False, highlight=False)


def list_workers(
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    alive: Annotated[bool, typer.Option("--alive", help="Only workers heartbeating now")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Registered workers, their devices, and whether they are alive."""
    with client(gateway, token_file) as api:
        workers = api.workers(alive=alive)
    if as_json:
        print_json([w.model_dump(mode="json") for w in workers])
        return
    table = Table("id", "name", "devices", "modules", "functions", "state", "last seen")
    for w in workers:
        caps = w.capabilities
        devices = ", ".join(
            f"{d.kind}:{d.name}" + (f" {d.memory_bytes / 1024**3:.0f}GB" if d.memory_bytes else "")
            for d in caps.devices
        )
        seen = time.strftime("%H:%M:%S", time.localtime(w.last_seen))
        state = f"[{'green' if w.alive else 'red'}]{w.state}[/]"
        table.add_row(
            w.id[:12],
            caps.name,
            devices,
            ", ".join(caps.modules),
            str(len(caps.functions)),
            state,
            seen,
        )
    print_table(table)


def cancel(
    job_id: JobIdArg,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Cancel a job (a running one is killed on its worker)."""
    with client(gateway, token_file) as api:
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
    gpu: Annotated[
        str | None,
        typer.Option(help="Narrow the declared device: mps | cuda | cuda:<name> | mlx | gpu"),
    ] = None,
    memory: Annotated[float | None, typer.Option(help="Minimum accelerator memory, GB")] = None,
    fallback: Annotated[
        str | None, typer.Option(help="'none' to drop a declared CPU fallback")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Shorter timeout, seconds")] = None,
    retries: Annotated[int | None, typer.Option(min=0, help="Fewer retries")] = None,
    priority: Annotated[int | None, typer.Option()] = None,
    key: Annotated[str | None, typer.Option("--key", help="Idempotency key")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait and print the result")
    ] = True,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a published function by import path (a worker must run with --import MODULE).

    Options left out are the function's declared ones; a given option may narrow them, never
    widen them (the gateway refuses). Exit status: 0 succeeded (or queued with --no-wait),
    1 failed or cancelled.
    """
    kwargs = {}
    for item in kwarg:
        name, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--kwarg {item!r} must look like name=value")
        kwargs[name] = _parse_arg(value)
    if fallback not in (None, "cpu", "none"):
        raise typer.BadParameter("--fallback is 'cpu' or 'none'")
    spec = JobSpec(
        function=function,
        payload=Payload(args=[_parse_arg(a) for a in arg], kwargs=kwargs),
        gpu=gpu,
        min_memory_gb=memory,
        fallback=fallback,  # type: ignore[arg-type]
        timeout_s=timeout,
        max_retries=retries,
        priority=priority,
        idempotency_key=key,
    )
    with client(gateway, token_file) as api:
        job = api.submit(spec)
        # The id first, always: whatever happens next, the job can be found again.
        if as_json and not wait:
            print_json(job.model_dump(mode="json"))
            return
        (err.print if as_json else console.print)(job.id, highlight=False)
        if not wait:
            return
        job = _wait_with_status(api, job)
    if as_json:
        print_json(job.model_dump(mode="json"))
    else:
        _print_job(job)
    raise_for_exit(job)


def _wait_with_status(api: Any, job: Job) -> Job:
    """Wait for the job; while it waits, one status line on stderr says why."""
    with err.status(f"{job.id[:12]} {job.state.value}") as status:
        while not job.state.terminal:
            job = api.get(job.id, wait=1.0 if job.state is JobState.queued else 30.0)
            status.update(
                f"{job.id[:12]} {job.state.value}" + (f": {job.waiting}" if job.waiting else "")
            )
    return job


def raise_for_exit(job: Job, *, waited: bool = True) -> None:
    """Exit 1 for a failed or cancelled job, 2 when a wait ended before the job did."""
    try:
        raise_for(job)
    except Exception:
        raise typer.Exit(1) from None
    if waited and not job.state.terminal:
        raise typer.Exit(2)


def prune(
    older_than: Annotated[str, typer.Option("--older-than", help="Age like 7d, 12h, 30m")] = "7d",
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask, even for an age under an hour")
    ] = False,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Delete finished jobs older than the given age (admin token). An age under an hour
    (`--older-than 0s` deletes every finished job) asks first, unless --yes."""
    seconds = parse_duration(older_than)
    if seconds < 3600 and not yes:
        if not sys.stdin.isatty():
            raise typer.BadParameter(
                f"--older-than {older_than} deletes recent results too: add --yes to confirm"
            )
        typer.confirm(
            f"delete every finished job older than {older_than}, results included?", abort=True
        )
    with client(gateway, token_file) as api:
        deleted = api.prune(seconds)
    console.print(f"deleted {deleted} finished job(s) older than {older_than}")
