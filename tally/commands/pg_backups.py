"""`tally pg:backups`, `pg:backups:capture`, `pg:backups:restore`, `pg:backups:download`
(an app's database backups, as Heroku's pg:backups) and the same four as `redis:backups*`
for its Redis's RDBs: over the API, for the app's people."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tally.client import Client, ClientError
from tally.commands.args import app_option
from tally.commands.http import doing, emit, http_command
from tally.console import table

FAMILIES = {"pg": ("postgresql", "database", "pg_dump", ".dump"),
            "redis": ("redis", "Redis", "an RDB copy", ".rdb")}


def family(prefix: str) -> list[click.Command]:
    """The four commands of one add-on kind: `<prefix>:backups[:capture|:restore|:download]`."""
    kind, what, how, suffix = FAMILIES[prefix]
    listing = f"/apps/{{app}}/backups?kind={kind}"

    def newest_verified(client: Client, app: str) -> str:
        good = [b["backup_id"] for b in client.get(listing.format(app=app))["backups"]
                if b["state"] == "verified"]
        if not good:
            raise click.ClickException(f"{app}'s {what} has no verified backup")
        return good[-1]

    @http_command(f"{prefix}:backups", json_output=True)
    @app_option
    def backups(client: Client, app: str, as_json: bool) -> None:
        emit(client.get(listing.format(app=app))["backups"], as_json, lambda rows: table(
            rows, ["backup_id", "state", "started_at", "size_bytes", "duration_s", "error"],
            f"{app}'s {what} has no backups yet (`tally {prefix}:backups:capture -a {app}`)"))
    backups.help = f"The backups of the app's {what}, oldest first."

    @http_command(f"{prefix}:backups:capture")
    @app_option
    def capture(client: Client, app: str) -> None:
        b = doing(f"Backing up {app}'s {what}", lambda: client.request(
            "POST", listing.format(app=app), timeout=3600),
            lambda b: f"done, {b['backup_id']} ({(b['size_bytes'] or 0) / 1e6:,.1f} MB)")
        click.echo(b["backup_id"])
    capture.help = f"Back up the app's {what} now ({how}), verified."

    @http_command(f"{prefix}:backups:restore")
    @app_option
    @click.argument("backup_id", required=False)
    @click.option("--confirm", help="The app's name, to go ahead without a prompt.")
    def restore(client: Client, app: str, backup_id: str | None,
                confirm: str | None) -> None:
        backup_id = backup_id or newest_verified(client, app)
        if confirm is None:
            if not sys.stdin.isatty():
                raise click.ClickException(f"this overwrites {app}'s {what}: pass "
                                           f"--confirm {app}")
            confirm = click.prompt(f"This overwrites {app}'s {what} with {backup_id}. "
                                   f"Type the app's name to go on")
        click.echo(f"Restoring {app}'s {what} from {backup_id}...", err=True)
        for event, data in client.stream_events(
                "POST", f"/apps/{app}/backups/{backup_id}/restore",
                json={"confirm": confirm, "progress": True}):
            if event == "error":
                raise click.ClickException(data)
            if event == "done":
                b = json.loads(data)
                click.echo(f"Restored {app}'s {what} from {backup_id} "
                           f"({(b['size_bytes'] or 0) / 1e6:,.1f} MB)", err=True)
                return
            click.echo(f"  {data}", err=True)
        raise click.ClickException("the API closed the stream before the restore ended: "
                                   f"see `tally {prefix}:backups -a {app}`")
    restore.help = (f"Restore the app's {what} from a backup (default: the newest "
                    f"verified), in place: what the backup holds replaces what is there.")

    @http_command(f"{prefix}:backups:download")
    @app_option
    @click.argument("backup_id", required=False)
    @click.option("-o", "--output", type=click.Path(dir_okay=False),
                  help=f"Where to write it (default: BACKUP_ID{suffix} here).")
    def download(client: Client, app: str, backup_id: str | None,
                 output: str | None) -> None:
        backup_id = backup_id or newest_verified(client, app)
        target = Path(output or f"{backup_id}{suffix}")
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
    download.help = f"Download a backup of the app's {what} (default: the newest verified)."

    return [backups, capture, restore, download]


COMMANDS = family("pg") + family("redis")
