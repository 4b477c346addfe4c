"""`tally` commands that reach an app's processes and output, over the API only (so they
work from any machine with the API's URL and a token): run, run:detached, ps:stop, logs,
addons, addons:create."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click

from tally.cli_apps import app_option, check_app, emit, http_command, table
from tally.client import Client, ClientError
from tally.config import api_client


def register(cli: click.Group) -> None:
    """Add this module's commands to the `tally` group."""
    _runs(cli)
    _logs(cli)
    _addons(cli)


def _api_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--api", envvar="TALLY_API", help="API URL (default: from "
                        "`tally login`, or http://127.0.0.1:8000).")(fn)


def _runs(cli: click.Group) -> None:
    @cli.command("run", context_settings={"ignore_unknown_options": True,
                                          "allow_interspersed_args": False})
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @click.option("-t/-T", "--tty/--no-tty", "tty", default=None,
                  help="Give the command a terminal (default: when stdin is one), as ssh.")
    @_api_option
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

    @cli.command("run:detached", context_settings={"ignore_unknown_options": True,
                                                   "allow_interspersed_args": False})
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @_api_option
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

    @http_command(cli, "ps:stop")
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


def _logs(cli: click.Group) -> None:
    @cli.command("logs")
    @click.argument("app_arg", metavar="[APP]", required=False)
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @click.option("-n", "--lines", default=100, show_default=True, help="Lines to show.")
    @click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
    @_api_option
    def logs(app_arg: str | None, app: str | None, lines: int, follow: bool,
             api: str | None) -> None:
        """An app's logs, as the log collector keeps them: `tally logs -a blog -f` (or
        `tally logs blog`). Detached runs' output is there too (as run.N)."""
        app = app_arg or app
        if not app:
            raise click.UsageError("which app? give -a APP (or TALLY_APP)")
        check_app(app)
        client = api_client(api)
        try:
            if not follow:
                for line in client.get(f"/apps/{app}/logs", lines=lines)["lines"]:
                    click.echo(line)
                return
            for line in client.stream_lines(f"/apps/{app}/logs", lines=lines, follow="true"):
                click.echo(line)
        except ClientError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            pass


def _addons(cli: click.Group) -> None:
    @http_command(cli, "addons", json_output=True)
    @app_option
    def addons(client: Client, app: str, as_json: bool) -> None:
        """The app's add-ons."""
        emit(client.get(f"/apps/{app}/addons")["addons"], as_json, lambda rows: table(
            rows, ["kind", "config_var"], f"{app} has no add-ons (`tally addons:create -a "
            f"{app} postgresql`)"))

    @cli.command("addons:create")
    @click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
    @click.argument("words", nargs=-1, required=True, metavar="[APP] postgresql")
    @_api_option
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
            r = api_client(api).post(f"/apps/{app}/addons", {"kind": kind})
        except ClientError as exc:
            click.echo("failed", err=True)
            raise click.ClickException(str(exc)) from exc
        release = f", v{r['release']}" if r.get("release") else ""
        click.echo(f"done{release}: DATABASE_URL is set", err=True)
