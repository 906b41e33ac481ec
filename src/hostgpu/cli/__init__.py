"""The `hostgpu` command line."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError

from hostgpu.cli import gateway, jobs, local, models, stack, tokens, worker
from hostgpu.cli import ray as ray_cli
from hostgpu.cli.common import err, print_json
from hostgpu.cli.doctor import doctor
from hostgpu.errors import HostGPUError, InvalidInput

app = typer.Typer(
    name="hostgpu",
    help="Run accelerator work where the accelerator really is.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from hostgpu import __version__

        sys.stdout.write(f"hostgpu {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    """Run accelerator work where the accelerator really is."""


app.command(help="What accelerators this process can use, and why not the others.")(doctor)
app.command("gateway", help="Run the gateway (HTTP API + job store).")(gateway.serve)
app.add_typer(worker.app, name="worker")
app.command("up")(local.up)
app.command("down")(local.down)
app.command("demo")(local.demo)
app.command("jobs")(jobs.list_jobs)
app.command("job")(jobs.show_job)
app.command("workers")(jobs.list_workers)
app.command("cancel")(jobs.cancel)
app.command("submit")(jobs.submit)
app.command("prune")(jobs.prune)
app.command("serve")(models.serve)
app.command("share")(models.share)
app.command("models")(models.list_models)
app.command("generate")(models.generate)
app.command("chat")(models.chat)
app.add_typer(tokens.app, name="token")
app.add_typer(stack.app, name="stack")
app.add_typer(ray_cli.app, name="ray")

try:  # the document pipeline's commands, when its module is present
    from hostgpu.cli import pipeline

    app.command("ingest")(pipeline.ingest)
    app.command("search")(pipeline.search)
except ImportError:  # pragma: no cover
    pass


def main() -> None:
    from hostgpu.settings import get_settings

    try:
        logging.basicConfig(
            level=get_settings().log_level.upper(),  # a bad setting is an error line too
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        # One line per HTTP request is noise at INFO; hostgpu logs what matters itself.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        app()
    except ValidationError as exc:  # an option the client's request models refuse
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        _fail(InvalidInput(f"invalid option: {where}: {first.get('msg')}".replace(": :", ":")), 2)
    except HostGPUError as exc:
        _fail(exc, 1)


def _fail(exc: HostGPUError, code: int) -> NoReturn:
    if _wants_json(sys.argv[1:]):
        # A pipe reading --json output parses the failure too, instead of getting nothing.
        print_json({"error": _error_record(exc)})
    else:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
    sys.exit(code)


def _wants_json(args: list[str]) -> bool:
    """Whether the command line asks for --json (before any `--`, after which it is data)."""
    return "--json" in args[: args.index("--")] if "--" in args else "--json" in args


def _error_record(exc: HostGPUError) -> dict[str, object]:
    """What --json prints for a failure: its type, message, and the HTTP status if any."""
    record: dict[str, object] = {"type": type(exc).__name__, "message": str(exc)}
    status = getattr(exc, "status", None)
    if status is not None:
        record["status"] = status
    return record
