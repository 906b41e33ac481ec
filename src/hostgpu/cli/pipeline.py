"""`hostgpu ingest` and `hostgpu search`: the document pipeline from the shell."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

import hostgpu
from hostgpu.cli.common import (
    GatewayOpt,
    JsonOpt,
    TokenFileOpt,
    console,
    err,
    print_json,
    print_table,
    token_from,
)
from hostgpu.jobs import JobState
from hostgpu.sdk import GatewayBackend


def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders (PDF, PNG/JPEG, TXT/MD)")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk sub-folders")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait and show progress and results")
    ] = False,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    backend_address: Annotated[
        str | None,
        typer.Option(
            "--backend",
            help="ray://HOST:PORT (or ray) runs the same jobs on a Ray cluster; the files "
            "must be readable there (HOSTGPU_INGEST_ROOTS on the nodes). Default: the gateway",
        ),
    ] = None,
    by_path: Annotated[
        bool,
        typer.Option("--by-path", help="Send paths, not files: the workers share this folder"),
    ] = False,
) -> None:
    """Queue one ingest job per file; a worker renders, embeds and stores the pages.

    Files are uploaded to the gateway (each content once) so any worker can read them,
    wherever it runs; --by-path sends paths instead, for a folder the workers share
    (HOSTGPU_INGEST_ROOTS on the workers).
    """
    from hostgpu.pipelines.ingest import discover
    from hostgpu.pipelines.jobs import ingest_spec, upload_spec

    files = discover(paths, recursive=recursive)
    if not files:
        err.print("no supported files found (PDF, PNG, JPEG, TXT, MD)")
        raise typer.Exit(1)
    backend = hostgpu.connect(backend_address or gateway, token_from(token_file))
    if not isinstance(backend, GatewayBackend):
        _ingest_through(files)
        return
    client = backend.client
    if by_path:
        specs = [ingest_spec(f) for f in files]
    else:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            uploading = bar.add_task("upload", total=len(files))
            specs = []
            for f in files:
                specs.append(upload_spec(client, f))
                bar.advance(uploading)
    ids = client.submit_batch(specs)
    if not wait:
        for path, job_id in zip(files, ids, strict=True):
            console.print(f"{job_id}  {path}")
        console.print(f"queued {len(ids)} file(s); watch them with `hostgpu jobs`")
        return
    pending = dict(zip(ids, files, strict=True))
    table = Table("file", "pages", "chunks", "device", "seconds", "result")
    failures = pages = 0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as bar:
        files_task = bar.add_task("files", total=len(ids))
        pages_task = bar.add_task("pages", total=None)
        while pending:
            for job in client.wait(list(pending)[:1000], timeout=10):
                path = pending.pop(job.id)
                bar.advance(files_task)
                if job.state is JobState.succeeded:
                    result = job.result
                    pages += result["pages"]
                    bar.update(pages_task, completed=pages)
                    table.add_row(*_done_row(path, result))
                else:
                    failures += 1
                    message = job.error.message if job.error else job.state.value
                    table.add_row(str(path), "", "", job.device or "", "", f"[red]{message}[/]")
    _summary(table, len(ids), failures, pages)


def _done_row(path: Path, result: dict[str, Any]) -> tuple[str, ...]:
    """A table row for a file ``ingest_file`` finished."""
    notes = f" ({'; '.join(result['notes'])})" if result.get("notes") else ""
    return (
        str(path),
        str(result["pages"]),
        str(result["chunks"]),
        result["device"],
        f"{result['timings']['total_s']:.2f}",
        "[green]ok[/]" + notes,
    )


def _summary(table: Table, files: int, failures: int, pages: int) -> None:
    print_table(table)
    console.print(f"{files - failures} file(s) ingested, {failures} failed, {pages} pages")
    if failures:
        raise typer.Exit(1)


def _ingest_through(files: list[Path]) -> None:
    """Ingest on a backend without a job store (Ray): one call per file, waited for here,
    because Ray ends a driver's calls when the driver exits."""
    from hostgpu.errors import JobError
    from hostgpu.pipelines.ingest import ingest_file

    handles = [ingest_file.spawn(str(p.resolve()), display_path=str(p.resolve())) for p in files]
    table = Table("file", "pages", "chunks", "device", "seconds", "result")
    failures = pages = 0
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console) as bar:
        files_task = bar.add_task("files", total=len(handles))
        for path, handle in zip(files, handles, strict=True):
            try:
                result = handle.result()
            except JobError as exc:
                failures += 1
                table.add_row(str(path), "", "", "", "", f"[red]{exc.message}[/]")
            else:
                pages += result["pages"]
                table.add_row(*_done_row(path, result))
            bar.advance(files_task)
    _summary(table, len(files), failures, pages)


def search(
    query: Annotated[str, typer.Argument(help="What to look for")],
    k: Annotated[int, typer.Option("-k", min=1, max=100, help="How many hits")] = 5,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the ingested pages (the query is embedded on a worker, with the same model)."""
    from hostgpu.pipelines.jobs import run_search

    hostgpu.connect(gateway, token_from(token_file))
    hits = run_search(query, k)
    if as_json:
        print_json(hits)
        return
    if not hits:
        console.print("no results: ingest something first (`hostgpu ingest PATH --wait`)")
        return
    table = Table("score", "file", "page", "snippet")
    for hit in hits:
        table.add_row(
            f"{hit['score']:.3f}", Path(hit["file"]).name, str(hit["page"]), hit["snippet"]
        )
    print_table(table)
