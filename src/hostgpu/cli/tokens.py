"""`hostgpu token create|list|revoke`."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.table import Table

from hostgpu.cli.common import GatewayOpt, JsonOpt, TokenOpt, client, console

app = typer.Typer(help="Create, list and revoke API tokens (needs an admin token).")


@app.command()
def create(
    scope: Annotated[str, typer.Option(help="admin | submit | worker")],
    name: Annotated[str, typer.Option(help="A note on who uses it")] = "",
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once."""
    if scope not in ("admin", "submit", "worker"):
        raise typer.BadParameter("scope must be admin, submit or worker")
    with client(gateway, token) as api:
        created = api.create_token(name or f"{scope} token", scope)
    if as_json:
        console.print_json(data=created)
    else:
        console.print(f"{created['scope']} token {created['id']} ({created['name']}):")
        console.print(created["token"], markup=False, highlight=False)


@app.command("list")
def list_tokens(
    gateway: GatewayOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Every token and whether it is revoked (never the secrets)."""
    with client(gateway, token) as api:
        tokens = api.list_tokens()
    if as_json:
        console.print_json(data=tokens)
        return
    table = Table("id", "name", "scope", "created", "revoked")
    for t in tokens:
        revoked = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(t["revoked_at"]))
            if t["revoked_at"]
            else ""
        )
        table.add_row(
            t["id"],
            t["name"],
            t["scope"],
            time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created_at"])),
            revoked,
        )
    console.print(table)


@app.command()
def revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (from `hostgpu token list`)")],
    gateway: GatewayOpt = None,
    token: TokenOpt = None,
) -> None:
    """Revoke a token; it stops working on its next request."""
    with client(gateway, token) as api:
        api.revoke_token(token_id)
    console.print(f"revoked {token_id}")
