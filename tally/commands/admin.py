"""`tally admin ...`: operator commands. `create-user` and `suffix` write to the ledger
directly, so they run on a ledger host; `quota` goes through the API (admins)."""

from __future__ import annotations

from typing import Any

import click

from tally.client import Client
from tally.commands.http import emit, http_command


@click.group()
def admin() -> None:
    """Operator commands, run on a ledger host (they write to the ledger directly)."""


@admin.command("create-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "member", "agent", "balancer", "builder"]),
              default="member", show_default=True)
@click.option("--host", "host_id", help="The host an agent or balancer token acts for (a "
              "builder's name for a builder token).")
@click.pass_obj
def create_user(cfg: Any, name: str, role: str, host_id: str | None) -> None:
    """Create a user and print their API token (shown once)."""
    from api.auth import create_user as create
    from api.auth import host_binding_problem
    from ledger import Ledger, LedgerError

    if problem := host_binding_problem(role, host_id):  # said before any database is asked
        raise click.ClickException(f"{problem} (--host)")
    try:
        with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=5) as ledger:
            token = create(ledger, name, role, host_id)
    except LedgerError as exc:
        msg = f"a user named {name!r} exists" if "expected no stream" in str(exc) else exc
        raise click.ClickException(str(msg)) from exc

    click.echo(token)


@http_command("quota", json_output=True, group=admin)
@click.argument("subject", type=click.Choice(["user", "app"]))
@click.argument("name")
@click.option("--instances", type=int, help="Instances at once.")
@click.option("--memory-mb", type=int, help="Memory of all instances together, MiB.")
@click.option("--bundle-mb", type=int, help="A bundle upload, MiB.")
@click.option("--slug-mb", type=int, help="A built slug, MiB.")
@click.option("--unpacked-mb", type=int, help="What a bundle or slug unpacks to, MiB.")
@click.option("--database-mb", type=int,
              help="One PostgreSQL add-on database, MiB (past it read-only, then refused).")
@click.option("--default", "defaults", multiple=True,
              type=click.Choice(["instances", "memory_mb", "bundle_mb", "slug_mb",
                                 "unpacked_mb", "database_mb"]),
              help="Put a limit back to the default.")
def quota(client: Client, subject: str, name: str, defaults: tuple[str, ...],
          as_json: bool, **limits: int | None) -> None:
    """Show a user's or an app's quota and usage; with options, set it (admins)."""
    path = f"/quotas/{subject}s/{name}"
    changes: dict[str, int | None] = {k: v for k, v in limits.items() if v is not None}
    changes.update(dict.fromkeys(defaults))
    shown = client.request("PUT", path, json=changes) if changes else client.get(path)
    def text(q: dict[str, Any]) -> None:
        for k, v in q["limits"].items():
            click.echo(f"{k:12} {q['used'].get(k, '-')!s:>8} of {v}")
    emit(shown, as_json, text)


@admin.command("suffix")
@click.argument("suffix", required=False)
@click.pass_obj
def suffix(cfg: Any, suffix: str | None) -> None:
    """Print the platform suffix apps answer under (<app>.SUFFIX), or set it."""
    from ledger import LedgerError
    from tally.platform import platform_suffix

    try:
        click.echo(platform_suffix(cfg, suffix.lower().rstrip(".") if suffix else None))
    except LedgerError as exc:
        raise click.ClickException(str(exc)) from exc


COMMANDS = [admin]
