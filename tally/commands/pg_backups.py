"""`tally pg:backups`, `pg:backups:capture`, `pg:backups:restore`, `pg:backups:download`:
an app's database backups, over the API (as Heroku's pg:backups)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tally.client import Client, ClientError
from tally.commands.args import app_option
from tally.commands.http import doing, emit, http_command
from tally.console import table


@http_command("pg:backups", json_output=True)
@app_option
def pg_backups(client: Client, app: str, as_json: bool) -> None:
    """The backups of the app's database, oldest first."""
    emit(client.get(f"/apps/{app}/backups")["backups"], as_json, lambda rows: table(
        rows, ["backup_id", "state", "started_at", "size_bytes", "duration_s", "error"],
        f"{app} has no backups yet (`tally pg:backups:capture -a {app}`)"))


@http_command("pg:backups:capture")
@app_option
def pg_backups_capture(client: Client, app: str) -> None:
    """Back up the app's database now (pg_dump), verified."""
    b = doing(f"Backing up {app}'s database", lambda: client.request(
        "POST", f"/apps/{app}/backups", timeout=3600),
        lambda b: f"done, {b['backup_id']} ({(b['size_bytes'] or 0) / 1e6:,.1f} MB)")
    click.echo(b["backup_id"])


def _newest_verified(client: Client, app: str) -> str:
    good = [b["backup_id"] for b in client.get(f"/apps/{app}/backups")["backups"]
            if b["state"] == "verified"]
    if not good:
        raise click.ClickException(f"{app} has no verified backup")
    return good[-1]


@http_command("pg:backups:restore")
@app_option
@click.argument("backup_id", required=False)
@click.option("--confirm", help="The app's name, to go ahead without a prompt.")
def pg_backups_restore(client: Client, app: str, backup_id: str | None,
                       confirm: str | None) -> None:
    """Restore the app's database from a backup (default: the newest verified), in place:
    what the backup holds is dropped and made again."""
    backup_id = backup_id or _newest_verified(client, app)
    if confirm is None:
        if not sys.stdin.isatty():
            raise click.ClickException(f"this overwrites {app}'s database: pass --confirm {app}")
        confirm = click.prompt(f"This overwrites {app}'s database with {backup_id}. "
                               f"Type the app's name to go on")
    doing(f"Restoring {app}'s database from {backup_id}", lambda: client.post(
        f"/apps/{app}/backups/{backup_id}/restore", {"confirm": confirm}))


@http_command("pg:backups:download")
@app_option
@click.argument("backup_id", required=False)
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Where to write it (default: BACKUP_ID.dump here).")
def pg_backups_download(client: Client, app: str, backup_id: str | None,
                        output: str | None) -> None:
    """Download a backup (default: the newest verified): a pg_dump archive that pg_restore
    reads."""
    backup_id = backup_id or _newest_verified(client, app)
    target = Path(output or f"{backup_id}.dump")
    headers = {"Authorization": f"Bearer {client.token}"} if client.token else {}
    try:
        with client.session.get(f"{client.api}/apps/{app}/backups/{backup_id}/download",
                                headers=headers, stream=True, timeout=(10, 300)) as r:
            if r.status_code != 200:
                raise ClientError(r.json().get("message", f"HTTP {r.status_code}"))
            with open(target, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot download {backup_id}: {exc}") from exc
    click.echo(str(target))


COMMANDS = [pg_backups, pg_backups_capture, pg_backups_restore, pg_backups_download]
