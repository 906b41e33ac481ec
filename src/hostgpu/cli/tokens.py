"""`hostgpu token create|list|revoke`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Column, Table

from hostgpu.cli.common import (
    GatewayOpt,
    JsonOpt,
    TokenFileOpt,
    client,
    console,
    parse_duration,
    print_json,
    print_table,
)
from hostgpu.tokens import MAX_LIFETIME_S, MIN_LIFETIME_S, SCOPES

app = typer.Typer(help="Create, list and revoke API tokens (needs an admin token).")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


@app.command()
def create(
    scope: Annotated[str, typer.Option(help=" | ".join(SCOPES))],
    name: Annotated[str, typer.Option(help="A note on who uses it")] = "",
    expires: Annotated[
        str | None, typer.Option(help="Lifetime like 30m, 12h, 7d (default: until revoked)")
    ] = None,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once (on stdout, alone, for `> file`)."""
    if scope not in SCOPES:
        raise typer.BadParameter(f"scope must be one of {', '.join(SCOPES)}")
    lifetime = None
    if expires is not None:  # even '': a mistake must not mint a token that never expires
        lifetime = parse_duration(expires, "--expires")
        if not MIN_LIFETIME_S <= lifetime <= MAX_LIFETIME_S:
            raise typer.BadParameter(
                f"{expires!r} is out of range: a token lives from 1s to 10 years "
                "(like 30m, 12h or 7d; leave --expires out for a token that never expires)",
                param_hint="--expires",
            )
    with client(gateway, token_file) as api:
        created = api.create_token(name or f"{scope} token", scope, expires_in_s=lifetime)
    if as_json:
        print_json(created.model_dump())
        return
    until = f", expires {_when(created.expires_at)}" if created.expires_at else ""
    typer.echo(f"{created.scope} token {created.id} ({created.name}{until}):", err=True)
    typer.echo(created.token)


@app.command("list")
def list_tokens(
    gateway: GatewayOpt = None, token_file: TokenFileOpt = None, as_json: JsonOpt = False
) -> None:
    """Every token and whether it is revoked or expired (never the secrets)."""
    with client(gateway, token_file) as api:
        tokens = api.list_tokens()
    if as_json:
        print_json([t.model_dump() for t in tokens])
        return
    now = time.time()
    # The id is what `token revoke` takes: never cut (the other columns wrap instead).
    table = Table(Column("id", no_wrap=True), "name", "scope", "created", "expires", "state")
    for t in tokens:
        state = (
            "revoked"
            if t.revoked_at
            else ("expired" if t.expires_at and t.expires_at <= now else "active")
        )
        table.add_row(
            t.id, t.name, t.scope, _when(t.created_at), _when(t.expires_at) or "never", state
        )
    print_table(table)


@app.command()
def revoke(
    token_id: Annotated[
        str,
        typer.Argument(
            help="Token id (from `hostgpu token list`), or a unique prefix (4+) of an active one"
        ),
    ],
    force: Annotated[
        bool,
        typer.Option("--force", help="Revoke even the last active admin token (locks you out)"),
    ] = False,
    gateway: GatewayOpt = None,
    token_file: TokenFileOpt = None,
) -> None:
    """Revoke a token; it stops working on its next request."""
    with client(gateway, token_file) as api:
        info = api.revoke_token(token_id, force=force)
    console.print(f"revoked {info.id} ({info.scope}: {info.name})", markup=False, highlight=False)
