"""`tally run`, `run:detached`, `ps:stop`: one-off commands in an app's release, over the
API only (so they work from any machine with the API's URL and a token)."""

from __future__ import annotations

import os
import sys

import click

from tally.client import Client, ClientError
from tally.commands.args import api_option, app_option, check_app
from tally.commands.http import http_command
from tally.config import api_client


@click.command("run", context_settings={"ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@click.option("-t/-T", "--tty/--no-tty", "tty", default=None,
              help="Give the command a terminal (default: when stdin is one), as ssh.")
@api_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(app: str | None, tty: bool | None, api: str | None,
        command: tuple[str, ...]) -> None:
    """Run a one-off command in the app's current release on a host, attached:
    `tally run -a blog -- python manage.py shell` (or `tally run blog -- ...`).

    With a terminal on stdin the command gets a pty of its size and keys go to it
    (Ctrl-C, Ctrl-D as in ssh); piped stdin is streamed (`echo 'print(1)' | tally run
    -a blog -- python`). Exits with the command's code."""
    from tally.terminal import RunError, attach

    explicit = (click.get_current_context().get_parameter_source("app")
                is click.core.ParameterSource.COMMANDLINE)
    app, argv = app_and_command(app, command, explicit)
    if tty is None:
        tty = os.isatty(0)
    try:
        client = api_client(api)
        started = client.post(f"/apps/{app}/runs", {"command": argv})
        code = attach(client.api, client.token, started["attach"], 0, sys.stdout.buffer,
                      tty)
    except (ClientError, RunError) as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@click.command("run:detached", context_settings={"ignore_unknown_options": True,
                                               "allow_interspersed_args": False})
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@api_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run_detached(app: str | None, api: str | None, command: tuple[str, ...]) -> None:
    """Run a one-off command in the background: its output goes to the app's logs
    (`tally logs -a blog`), `tally ps` lists it as run.N, `tally ps:stop run.N` ends
    it: `tally run:detached -a blog -- python manage.py rebuild_index`."""
    explicit = (click.get_current_context().get_parameter_source("app")
                is click.core.ParameterSource.COMMANDLINE)
    app, argv = app_and_command(app, command, explicit)
    shown = " ".join(argv)
    click.echo(f"Running {shown} on {app}... ", err=True, nl=False)
    try:
        r = api_client(api).post(f"/apps/{app}/runs", {"command": argv, "detached": True})
    except ClientError as exc:
        click.echo("failed", err=True)
        raise click.ClickException(str(exc)) from exc
    click.echo(f"up, run.{r['number']} on host {r['host_id']} (`tally logs -a {app} "
               f"-f` shows its output)", err=True)


@http_command("ps:stop")
@app_option
@click.argument("process")
def ps_stop(client: Client, app: str, process: str) -> None:
    """Stop a one-off run: `tally ps:stop -a blog run.3` (SIGTERM, SIGKILL 10 s later).
    Instances are scaled, not stopped: `tally scale -a blog web=0`."""
    name, _, number = process.partition(".")
    if name != "run" or not number.isdigit():
        raise ClientError(f"{process!r} is not a run like run.3 (instances are scaled: "
                          f"`tally scale -a {app} web=0`)")
    click.echo(f"Stopping {process} of {app}... ", err=True, nl=False)
    client.post(f"/apps/{app}/runs/{number}/stop", {})
    click.echo("done", err=True)


def app_and_command(app: str | None, words: tuple[str, ...],
                    explicit: bool = False) -> tuple[str, list[str]]:
    """`run`'s app and command from `-a APP [--] CMD...` (explicit: all words are the
    command) or `APP -- CMD...` (the app named before `--` wins over TALLY_APP)."""
    if explicit:
        argv = list(words[1:] if words[:1] == ("--",) else words)
    elif "--" in words:
        cut = words.index("--")
        before, argv = words[:cut], list(words[cut + 1:])
        if len(before) == 1:
            app = before[0]
        elif before:
            raise click.UsageError("put the command after --: tally run -a APP -- CMD")
    else:
        argv = list(words)
        if app is None and argv:
            app = argv.pop(0)
    if not app or not argv:
        raise click.UsageError("give the app and the command: tally run -a APP -- CMD")
    return check_app(app), argv


COMMANDS = [run, run_detached, ps_stop]
