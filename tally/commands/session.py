"""`tally login` and `tally whoami`: the API token this machine's CLI uses."""

from __future__ import annotations

import click

from tally.client import Client, ClientError, save_credentials
from tally.commands.http import emit, http_command
from tally.config import api_client, credentials_path


@click.command("login")
@click.option("--api", envvar="TALLY_API", default=None, help="API URL.")
@click.option("--token", envvar="TALLY_TOKEN", help="API token (prompted if not given).")
def login(api: str | None, token: str | None) -> None:
    """Check an API token and save it for the next commands."""
    token = token or click.prompt("API token", hide_input=True)
    client = api_client(api, token)
    try:
        me = client.get("/me")
        name, role = me["name"], me["role"]
    except ClientError as exc:
        raise click.ClickException(str(exc)) from exc
    except (KeyError, TypeError) as exc:
        raise click.ClickException(f"{client.api} answered /me with something else: "
                                   "is it the tally API?") from exc
    path = save_credentials(credentials_path(), client.api, token, name)
    click.echo(f"logged in to {client.api} as {name} ({role}); "
               f"token saved in {path}", err=True)


@http_command("whoami", json_output=True)
def whoami(client: Client, as_json: bool) -> None:
    """Who the saved token belongs to."""
    emit(client.get("/me"), as_json, lambda me: click.echo(f"{me['name']} ({me['role']})"))


COMMANDS = [login, whoami]
