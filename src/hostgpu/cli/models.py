"""Inference from the command line: serve or lend models, list them, chat, generate."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hostgpu.cli.common import (
    ChannelOpt,
    GatewayOpt,
    JsonOpt,
    TokenFileOpt,
    client,
    console,
    err,
    install_service,
    native_report,
    print_json,
    print_table,
    token_from,
)
from hostgpu.client import Client

GB = 1e9

ConcurrencyOpt = Annotated[
    int, typer.Option("--max-concurrency", min=1, max=256, help="Generations at once")
]
KeepAliveOpt = Annotated[
    float, typer.Option(min=0, help="Seconds an unused model stays loaded (Ollama's keep_alive)")
]
MemoryOpt = Annotated[
    float | None,
    typer.Option("--max-memory", min=0.01, help="GB the loaded models may take together"),
]
GraceOpt = Annotated[
    float, typer.Option(help="Seconds a stop waits for in-flight generations to finish")
]
AllowContainerOpt = Annotated[
    bool,
    typer.Option("--allow-container", help="Run even inside a container on a Mac's VM (no Metal)"),
]
MaxTokensOpt = Annotated[int | None, typer.Option(min=1, help="Most tokens to generate")]
TemperatureOpt = Annotated[
    float, typer.Option(min=0, max=2, help="0: greedy (deterministic); higher: more varied")
]


@dataclass(frozen=True)
class _Server:
    """A model server's run, as `serve` and `share` configure it."""

    models: list[str]
    gateway: str | None
    token_file: Path | None
    concurrency: int
    keep_alive: float
    max_memory: float | None
    grace: float
    name: str
    allow_container: bool
    until: float | None = None  # `share`'s time limit
    only_when_idle: bool = False
    status: bool = False  # the live status line
    channel: bool = True


def _run_server(server: _Server) -> int:
    from hostgpu.worker.agent import WorkerAgent, WorkerConfig

    report = native_report(server.allow_container, "it")
    gate = _IdleGate() if server.only_when_idle else None
    until = server.until
    agent = WorkerAgent(
        WorkerConfig(
            gateway=server.gateway,
            token=token_from(server.token_file),
            models=server.models,
            concurrency=server.concurrency,
            name=server.name,
            grace=server.grace,
            report=report,
            keep_alive=server.keep_alive,
            memory_budget=None if server.max_memory is None else int(server.max_memory * GB),
            may_lease=gate.may_lease if gate else None,
            channel=server.channel,
        )
    )
    agent.install_signal_handlers()
    device = getattr(agent.pool, "device", "cpu")
    console.print(
        f"serving {', '.join(server.models)} on {device} as {agent.caps.name}", highlight=False
    )
    done = threading.Event()
    if until is not None:

        def stop_at_deadline() -> None:
            if not done.wait(max(0.0, until - time.time())):
                err.print("time limit reached: finishing in-flight requests, then stopping")
                agent.request_stop()

        threading.Thread(target=stop_at_deadline, daemon=True).start()
    if server.status:
        threading.Thread(
            target=_status_line, args=(agent, device, until, gate, done), daemon=True
        ).start()
    try:
        return agent.run()
    finally:
        done.set()


class _IdleGate:
    """``--only-when-idle``: lease only while the rest of the machine leaves the CPU idle
    (the model server's own load does not count)."""

    def __init__(self, busy_percent: float = 50.0) -> None:
        import psutil

        self.busy_percent = busy_percent
        self._me = psutil.Process()
        self._cpus = psutil.cpu_count() or 1
        psutil.cpu_percent(None)
        self._me.cpu_percent(None)
        self._checked = 0.0
        self.idle = True

    def may_lease(self) -> bool:
        import psutil

        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            others = psutil.cpu_percent(None) - self._me.cpu_percent(None) / self._cpus
            self.idle = others < self.busy_percent
        return self.idle


def _status_line(
    agent: Any, device: str, until: float | None, gate: _IdleGate | None, done: threading.Event
) -> None:
    """One line, rewritten in place: requests served, tokens, device, time left."""
    if not sys.stderr.isatty():
        return
    while not done.wait(1.0):
        pool = agent.pool
        left = ""
        if until is not None:
            minutes = max(0, int(until - time.time())) // 60
            left = f" · {minutes // 60}h{minutes % 60:02d}m left"
        paused = " · paused (machine busy)" if gate is not None and not gate.idle else ""
        line = (
            f"{pool.served} served · {pool.tokens} tokens · {len(pool.running())} running · "
            f"{device}{left}{paused}"
        )
        sys.stderr.write("\r\x1b[2K" + line)
        sys.stderr.flush()
    sys.stderr.write("\n")


def serve(
    models: Annotated[list[str], typer.Argument(help="Model names (`hostgpu models --all`)")],
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    concurrency: ConcurrencyOpt = 4,
    keep_alive: KeepAliveOpt = 300.0,
    max_memory: MemoryOpt = None,
    grace: GraceOpt = 30.0,
    name: Annotated[str, typer.Option(help="Server name (default: host-pid)")] = "",
    allow_container: AllowContainerOpt = False,
    channel: ChannelOpt = True,
) -> None:
    """Serve models to the gateway's inference API from this machine's best device.

    Models load on first use and stay warm for --keep-alive seconds. Ctrl-C (or SIGTERM)
    finishes in-flight generations, then stops; a second one stops at once.
    """
    server = _Server(
        models, gateway, token_file, concurrency, keep_alive, max_memory, grace, name,
        allow_container, channel=channel,
    )  # fmt: skip
    raise typer.Exit(_run_server(server))


def _deadline(hours: float | None, until: str | None) -> float | None:
    if hours is not None and until is not None:
        raise typer.BadParameter("give --hours or --until, not both")
    if hours is not None:
        return time.time() + hours * 3600
    if until is None:
        return None
    try:
        if ":" in until and len(until) <= 5:
            hour, minute = (int(part) for part in until.split(":"))
            now = datetime.now()
            moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if moment <= now:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(until)
    except ValueError:
        raise typer.BadParameter(
            f"--until {until!r}: use HH:MM (the next such time) or an ISO date and time"
        ) from None
    if moment.timestamp() <= time.time():
        raise typer.BadParameter(f"--until {until} has passed already")
    return moment.timestamp()


def share(
    gateway: Annotated[
        str, typer.Option("--gateway", envvar="HOSTGPU_GATEWAY", help="The borrower's gateway")
    ],
    token_file: TokenFileOpt = None,
    models: Annotated[
        str, typer.Option(help="Comma-separated models to lend (default: smollm2)")
    ] = "smollm2",
    hours: Annotated[float | None, typer.Option(min=0.001, help="Lend for this long")] = None,
    until: Annotated[str | None, typer.Option(help="Lend until HH:MM or an ISO time")] = None,
    max_memory: MemoryOpt = None,
    concurrency: ConcurrencyOpt = 2,
    only_when_idle: Annotated[
        bool,
        typer.Option("--only-when-idle", help="Pause while the rest of this machine is busy"),
    ] = False,
    keep_alive: KeepAliveOpt = 300.0,
    grace: GraceOpt = 60.0,
    name: Annotated[str, typer.Option(help="This machine's name (default: host-pid)")] = "",
    allow_container: AllowContainerOpt = False,
    channel: ChannelOpt = True,
    install: Annotated[
        bool,
        typer.Option(
            "--install",
            help="Write a launchd/systemd service that lends with these limits (needs "
            "--token-file), instead of lending now",
        ),
    ] = False,
    print_only: Annotated[
        bool, typer.Option("--print", help="With --install: print the file, write nothing")
    ] = False,
) -> None:
    """Lend this machine's accelerator to someone else's gateway, within your limits.

    The token (scope share, from `hostgpu token create --scope share` on their gateway) lets
    this machine serve the models you list and nothing else: no job of theirs runs code here.
    It connects out only. Ctrl-C, SIGTERM or the time limit finishes in-flight requests,
    unloads the models and leaves.
    """
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not names:
        raise typer.BadParameter("--models names no model")
    deadline = _deadline(hours, until)
    if install:
        args = ["--models", ",".join(names), "--max-concurrency", str(concurrency)]
        args += ["--keep-alive", f"{keep_alive:g}", "--grace", f"{grace:g}"]
        if max_memory is not None:
            args += ["--max-memory", f"{max_memory:g}"]
        if deadline is not None:  # absolute: a restarted service keeps the same end
            args += ["--until", datetime.fromtimestamp(deadline).isoformat(timespec="seconds")]
        if only_when_idle:
            args.append("--only-when-idle")
        if name:
            args += ["--name", name]
        if not channel:
            args.append("--no-channel")
        _install_share(gateway, token_file, args, print_only)
        return
    server = _Server(
        names, gateway, token_file, concurrency, keep_alive, max_memory, grace, name,
        allow_container, until=deadline, only_when_idle=only_when_idle, status=True,
        channel=channel,
    )  # fmt: skip
    raise typer.Exit(_run_server(server))


def _install_share(
    gateway: str, token_file: Path | None, args: list[str], print_only: bool
) -> None:
    from hostgpu.processes import hostgpu_command
    from hostgpu.settings import get_settings, read_secret
    from hostgpu.worker.service import command_service

    if token_file is None:
        raise typer.BadParameter(
            "--install needs --token-file: the share token in a 0600 file (the service reads "
            "it from there; a service file never holds a token)"
        )
    token_file = token_file.expanduser().absolute()
    read_secret(token_file)  # private and not empty, or say how to fix it now
    command = hostgpu_command("share", "--gateway", gateway, *args)
    service = command_service(
        sys.platform, command, token_file, Path.home(), get_settings().home_dir, kind="share"
    )
    install_service(service, print_only)


def list_models(
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    all_known: Annotated[
        bool, typer.Option("--all", help="Every model this machine's registry knows instead")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The models the gateway's model servers serve, and where each is loaded now."""
    if all_known:
        from hostgpu.inference.models import load_registry

        specs = load_registry().specs()
        if as_json:
            print_json([spec.describe() for spec in specs])
            return
        table = Table("model", "engine", "memory", "description")
        for spec in specs:
            memory = f"{spec.estimated_memory_bytes() / GB:.2f} GB"
            table.add_row(spec.name, spec.engine, memory, spec.description)
        print_table(table)
        return
    with client(gateway, token_file) as c:
        listing = c.models()
    if as_json:
        print_json(listing.model_dump(mode="json"))
        return
    if not listing.data:
        console.print("no model server is connected: start one with `hostgpu serve smollm2`")
        return
    table = Table("model", "servers", "loaded on")
    for card in listing.data:
        servers = ", ".join(s["worker"] for s in card.servers or [])
        loaded = (
            ", ".join(
                f"{e['worker']} ({e['device']}, {e['active']} active)" for e in card.loaded_on
            )
            or "-"
        )
        table.add_row(card.id, servers, loaded)
    print_table(table)


def stream_chat(
    api: Client,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int | None,
    temperature: float,
    *,
    on_first: Callable[[], object] | None = None,
    echo: bool = True,
) -> tuple[str, dict[str, Any]]:
    """A chat answer and its figures, printed to stdout as it streams when ``echo``."""
    body: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    parts: list[str] = []
    usage: dict[str, Any] = {}
    started = time.perf_counter()
    first: float | None = None
    with api:
        for chunk in api.stream_completion("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    if first is None:
                        first = time.perf_counter()
                        if on_first is not None:
                            on_first()
                    parts.append(text)
                    if echo:
                        sys.stdout.write(text)
                        sys.stdout.flush()
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    tokens = int(usage.get("completion_tokens", 0))
    span = ended - (first or ended)
    figures = {
        "usage": usage,
        "time_to_first_token_s": None if first is None else round(first - started, 3),
        "tokens_per_s": round(tokens / span, 1) if span > 0 else None,
    }
    return "".join(parts), figures


def figures_line(figures: dict[str, Any]) -> str:
    usage = figures["usage"]
    parts = [f"{usage.get('completion_tokens', 0)} tokens"]
    if figures["tokens_per_s"]:
        parts.append(f"{figures['tokens_per_s']} tok/s")
    if figures["time_to_first_token_s"] is not None:
        parts.append(f"first token {figures['time_to_first_token_s'] * 1000:.0f} ms")
    return " · ".join(parts)


def generate(
    model: Annotated[str, typer.Argument(help="Model name")],
    prompt: Annotated[str, typer.Argument(help="What to ask")],
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = 0.0,
    as_json: JsonOpt = False,
) -> None:
    """Answer one prompt, streaming the text (with --json: one JSON object at the end)."""
    messages = [{"role": "user", "content": prompt}]
    if as_json:
        text, figures = stream_chat(
            client(gateway, token_file), model, messages, max_tokens, temperature, echo=False
        )
        print_json({"model": model, "text": text, **figures})
        return
    _, figures = stream_chat(client(gateway, token_file), model, messages, max_tokens, temperature)
    sys.stdout.write("\n")
    err.print(figures_line(figures), style="dim", highlight=False)


def chat(
    model: Annotated[str, typer.Argument(help="Model name")],
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    system: Annotated[str | None, typer.Option(help="A system prompt")] = None,
    max_tokens: MaxTokensOpt = 512,
    temperature: TemperatureOpt = 0.7,
) -> None:
    """Chat with a model, streaming each answer (empty line or Ctrl-D to leave)."""
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    with client(gateway, token_file) as c:
        cards = {card.id: card for card in c.models().data}
    card = cards.get(model)
    if card is None:
        known = ", ".join(sorted(cards)) or "none"
        err.print(f"[red]no model server serves {model}[/] (served: {known})")
        raise typer.Exit(1)
    where = ", ".join(f"{e['worker']} on {e['device']}" for e in card.loaded_on) or (
        "not loaded yet: the first answer loads it"
    )
    err.print(f"{model}: {where}", style="dim", highlight=False)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if not line.strip():
            return
        messages.append({"role": "user", "content": line})
        try:
            answer, figures = stream_chat(
                client(gateway, token_file), model, messages, max_tokens, temperature
            )
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            messages.pop()
            continue
        sys.stdout.write("\n")
        err.print(figures_line(figures), style="dim", highlight=False)
        messages.append({"role": "assistant", "content": answer})
