"""`tally deploy`, `releases`, `rollback`: an app's releases (over the API)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import click

from tally import packing
from tally.buildlog import follow_build
from tally.client import Client, ClientError
from tally.commands.args import app_option
from tally.commands.http import doing, emit, http_command
from tally.console import table
from tally.rollout import follow


@http_command("deploy")
@app_option
@click.argument("folder", default=".", type=click.Path(exists=True, file_okay=False,
                                                        path_type=Path))
@click.option("-m", "--message", "description", default="", help="Release description.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Follow the rollout until the instances are healthy.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to follow.")
def deploy(client: Client, app: str, folder: Path, description: str, wait: bool,
           timeout: float) -> None:
    """Pack FOLDER (git's files in a work tree; never .env or local databases; minus
    .slugignore), upload it as a new release, show its build, and follow the rollout."""
    data, count = packing.pack(folder.resolve())
    digest = hashlib.sha256(data).hexdigest()
    with click.progressbar(length=len(data), file=sys.stderr,
                           label=f"uploading {count} files, {packing.size(len(data))}"
                                 ) as bar:
        release = client.upload(f"/apps/{app}/releases", data,
                                {"digest": digest, "description": description},
                                bar.update)
    number = release["number"]
    click.echo(f"release v{number} created", err=True)
    if wait:
        follow_build(client, app, number, max(timeout, 900.0), timeout)
        follow(client, app, number, timeout)
    url = client.get(f"/apps/{app}").get("web_url")
    if url:
        click.echo(f"{app} answers at {url}")


@http_command("releases", json_output=True)
@app_option
def releases(client: Client, app: str, as_json: bool) -> None:
    """The app's releases, newest first, with their rollout status and why a failed
    one failed."""
    def text(rows: list[dict[str, Any]]) -> None:
        for r in rows:
            r["version"] = f"v{r['number']}"
            r["digest"] = r["bundle_digest"][:12]
            r["failure"] = r.get("failure_reason")
        table(rows, ["version", "status", "description", "digest", "created_by",
                     "created_at", "failure"],
              f"{app} has no releases yet: `tally deploy -a {app}`")
    emit(client.get(f"/apps/{app}/releases")["releases"], as_json, text)


@http_command("rollback")
@app_option
@click.argument("release", required=False)
def rollback(client: Client, app: str, release: str | None) -> None:
    """A new release with an earlier one's code and config (default: the previous)."""
    number = None
    if release is not None:
        try:
            number = int(release.lstrip("v"))
        except ValueError:
            raise ClientError(f"{release!r} is not a release like v3") from None
    doing(f"Rolling back {app}" + (f" to v{number}" if number else ""),
          lambda: client.post(f"/apps/{app}/rollback", {"release": number}),
          lambda new: f"done, rolled back to v{new['rollback_of']} as v{new['number']}")


COMMANDS = [deploy, releases, rollback]
