"""`tally logs`: an app's logs as the collector keeps them, over the API."""

from __future__ import annotations

import click

from tally.client import ClientError
from tally.commands.args import api_option, check_app
from tally.config import api_client


@click.command("logs")
@click.argument("app_arg", metavar="[APP]", required=False)
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@click.option("-n", "--lines", default=100, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@api_option
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


COMMANDS = [logs]
