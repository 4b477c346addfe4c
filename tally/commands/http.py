"""How a user command speaks to the API: its client from `--api` or the saved login, errors
as one line, `--json` on reads, Heroku's confirmation line on writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from tally.client import ClientError
from tally.commands.args import api_option
from tally.config import api_client
from tally.console import fail_cleanly


def http_command(name: str, json_output: bool = False,
                 group: click.Group | None = None) -> Callable[[Callable[..., Any]],
                                                               click.Command]:
    """A command talking to the API (its first argument the client): `--api URL`, optional
    `--json`, errors as one line. Added to `group` if given (else listed in COMMANDS)."""
    def decorate(fn: Callable[..., Any]) -> click.Command:
        @wraps(fn)
        @fail_cleanly
        def run(*args: Any, api: str | None, **kwargs: Any) -> Any:
            client = None
            try:
                client = api_client(api)
                return fn(client, *args, **kwargs)
            except (KeyError, TypeError, AttributeError) as exc:  # an answer of another shape
                where = client.api if client else "the API"
                raise click.ClickException(f"unexpected answer from {where} ({exc!r} missing):"
                                           f" is it the tally API, and of this version?") from exc
        command: Callable[..., Any] = api_option(run)
        if json_output:
            command = click.option("--json", "as_json", is_flag=True,
                                   help="Machine-readable output.")(command)
        return (group.command(name) if group else click.command(name))(command)
    return decorate


def emit(data: Any, as_json: bool, text: Callable[[Any], None]) -> None:
    """An answer as JSON (`--json`) or as `text` prints it."""
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True))
    else:
        text(data)


def doing(what: str, fn: Callable[[], Any], done: Callable[[Any], str] = lambda _: "done"
          ) -> Any:
    """Heroku's confirmation line on stderr: `Setting K and restarting blog... done, v8`."""
    click.echo(f"{what}... ", err=True, nl=False)
    try:
        result = fn()
    except ClientError:
        click.echo("failed", err=True)
        raise
    click.echo(done(result), err=True)
    return result
