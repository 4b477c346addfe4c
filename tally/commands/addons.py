"""`tally addons`, `addons:create`: an app's add-ons, over the API."""

from __future__ import annotations

import click

from tally.client import Client, ClientError
from tally.commands.args import api_option, app_option, check_app
from tally.commands.http import emit, http_command
from tally.config import api_client
from tally.console import table


@http_command("addons", json_output=True)
@app_option
def addons(client: Client, app: str, as_json: bool) -> None:
    """The app's add-ons."""
    emit(client.get(f"/apps/{app}/addons")["addons"], as_json, lambda rows: table(
        rows, ["kind", "config_var"], f"{app} has no add-ons (`tally addons:create -a "
        f"{app} postgresql`)"))


@click.command("addons:create")
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@click.argument("words", nargs=-1, required=True, metavar="[APP] postgresql")
@api_option
def addons_create(app: str | None, words: tuple[str, ...], api: str | None) -> None:
    """Give the app a PostgreSQL database of its own; sets DATABASE_URL (a new release):
    `tally addons:create -a blog postgresql` (or `tally addons:create blog
    postgresql`)."""
    if len(words) == 2:
        app, kind = words
    elif len(words) == 1 and app:
        kind = words[0]
    else:
        raise click.UsageError("give the app and the kind: tally addons:create -a APP "
                               "postgresql")
    check_app(app)
    if kind != "postgresql":
        raise click.UsageError(f"{kind!r} is not an add-on tally has (postgresql)")
    click.echo(f"Creating {kind} for {app}... ", err=True, nl=False)
    try:
        # The first add-on makes the apps' cluster (Patroni's bootstrap: a minute or two).
        r = api_client(api).request("POST", f"/apps/{app}/addons", json={"kind": kind},
                                    timeout=300)
    except ClientError as exc:
        click.echo("failed", err=True)
        raise click.ClickException(str(exc)) from exc
    release = f", v{r['release']}" if r.get("release") else ""
    click.echo(f"done{release}: DATABASE_URL is set", err=True)


COMMANDS = [addons, addons_create]
