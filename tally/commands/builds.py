"""`tally builds` and `tally builds:output`: the app's builds and what they printed."""

from __future__ import annotations

import click

from tally.client import Client, ClientError
from tally.commands.args import app_option
from tally.commands.http import emit, http_command
from tally.console import table


@http_command("builds", json_output=True)
@app_option
def builds(client: Client, app: str, as_json: bool) -> None:
    """The app's builds, newest first: status, time, slug size, why one failed."""
    def text(rows: list[dict]) -> None:
        for r in rows:
            r["version"] = f"v{r['release']}"
            r["slug"] = (r["slug_digest"] or "")[:12]
            r["size"] = f"{r['size_bytes'] / 2**20:.1f} MB" if r["size_bytes"] else ""
            r["took"] = f"{r['seconds']:.1f}s" if r["seconds"] else ""
            if r["reused_from"]:
                r["took"] = f"reused v{r['reused_from']}"
        table(rows, ["version", "status", "took", "size", "slug", "reason"],
              f"{app} has no builds yet: `tally deploy`")
    emit(client.get(f"/apps/{app}/builds")["builds"], as_json, text)


@http_command("builds:output")
@app_option
@click.argument("release")
def builds_output(client: Client, app: str, release: str) -> None:
    """A release's build output (kept), e.g. `tally builds:output -a blog v3`."""
    try:
        number = int(release.lstrip("v"))
    except ValueError:
        raise ClientError(f"{release!r} is not a release like v3") from None
    b = client.get(f"/apps/{app}/releases/{number}/build", limit=1 << 20)
    click.echo(b["output"], nl=False)
    if b["status"] == "failed":
        click.echo(f"build failed: {b['reason']}", err=True)


COMMANDS = [builds, builds_output]
