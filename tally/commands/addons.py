"""`tally addons`, `addons:create`, `addons:destroy`, `addons:attach`, `addons:detach`: an
app's add-ons and their lifecycle, over the API."""

from __future__ import annotations

from typing import Any

import click

from tally.client import Client, ClientError
from tally.commands.args import api_option, app_option, check_app
from tally.commands.http import doing, emit, http_command
from tally.config import api_client
from tally.console import table

KINDS = ("postgresql", "redis")


@http_command("addons", json_output=True)
@app_option
def addons(client: Client, app: str, as_json: bool) -> None:
    """The app's add-ons: its own and those attached from its owner's other apps."""
    emit(client.get(f"/apps/{app}/addons")["addons"], as_json, lambda rows: table(
        rows, ["name", "kind", "plan", "state", "config_var", "owner", "where"],
        f"{app} has no add-ons (`tally addons:create -a {app} postgresql`)"))


@click.command("addons:create")
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@click.option("--plan", help="redis: mini (25 MB), standard (100 MB), cache (100 MB, evicts "
              "least recently used keys); postgresql: standard.")
@click.argument("words", nargs=-1, required=True, metavar="[APP] postgresql|redis")
@api_option
def addons_create(app: str | None, plan: str | None, words: tuple[str, ...],
                  api: str | None) -> None:
    """Give the app an add-on of its own: a PostgreSQL database (sets DATABASE_URL) or a
    Redis (sets REDIS_URL), a new release: `tally addons:create -a blog postgresql` (or
    `tally addons:create blog redis`)."""
    if len(words) == 2:
        app, kind = words
    elif len(words) == 1 and app:
        kind = words[0]
    else:
        raise click.UsageError("give the app and the kind: tally addons:create -a APP "
                               "postgresql")
    check_app(app)
    if kind not in KINDS:
        raise click.UsageError(f"{kind!r} is not an add-on tally has ({', '.join(KINDS)})")
    body: dict[str, Any] = {"kind": kind, **({"plan": plan} if plan else {})}
    click.echo(f"Creating {kind}-{app}... ", err=True, nl=False)
    try:
        # The first add-on makes the apps' cluster (Patroni's bootstrap: a minute or two).
        r = api_client(api).request("POST", f"/apps/{app}/addons", json=body, timeout=300)
    except ClientError as exc:
        click.echo("failed", err=True)
        raise click.ClickException(str(exc)) from exc
    var = next((a["config_var"] for a in r["addons"] if a["kind"] == kind), "its URL")
    release = f", v{r['release']}" if r.get("release") else ""
    click.echo(f"done{release}: {var} is set", err=True)


def _release(r: dict[str, Any]) -> str:
    return f"done, v{r['release']}" if r.get("release") else "done"


@http_command("addons:destroy")
@app_option
@click.argument("addon")
@click.option("--confirm", help="The app's name again, to confirm.")
def addons_destroy(client: Client, app: str, addon: str, confirm: str | None) -> None:
    """Destroy one of the app's own add-ons: its data is dropped, its config var unset here
    and in the apps it is attached to: `tally addons:destroy -a blog postgresql-blog
    --confirm blog`."""
    if confirm != app:
        raise ClientError(f"this drops {addon} and its data for good: repeat with "
                          f"--confirm {app}")
    doing(f"Destroying {addon} on {app}",
          lambda: client.request("DELETE", f"/apps/{app}/addons/{addon}"), _release)


@http_command("addons:attach")
@app_option
@click.argument("addon")
@click.option("--as", "alias", help="The config var's name: ALIAS_URL (default: the kind's, "
              "DATABASE_URL or REDIS_URL).")
def addons_attach(client: Client, app: str, addon: str, alias: str | None) -> None:
    """Let the app reach another app's add-on (both apps of one owner):
    `tally addons:attach -a shop postgresql-blog --as BLOG_DATABASE`."""
    body = {"addon": addon, **({"as": alias} if alias else {})}
    r = doing(f"Attaching {addon} to {app}",
              lambda: client.post(f"/apps/{app}/attachments", body), _release)
    var = next((a["config_var"] for a in r["addons"] if a["name"] == addon), "")
    click.echo(f"{var} is set", err=True)


@http_command("addons:detach")
@app_option
@click.argument("addon")
def addons_detach(client: Client, app: str, addon: str) -> None:
    """The app stops reaching another app's add-on: `tally addons:detach -a shop
    postgresql-blog`."""
    doing(f"Detaching {addon} from {app}",
          lambda: client.request("DELETE", f"/apps/{app}/attachments/{addon}"), _release)


COMMANDS = [addons, addons_create, addons_destroy, addons_attach, addons_detach]
