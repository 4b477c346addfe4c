"""`tally builds`, `tally builds:output` and the build part of `tally deploy`: a release's
build output as it comes (polled from the API), as `git push heroku` shows it."""

from __future__ import annotations

import time

import click

from tally.client import Client, ClientError


def follow_build(client: Client, app: str, number: int, timeout: float) -> None:
    """Print the build's output until it ends; a failed build exits 1 with its reason."""
    offset, deadline, said_waiting = 0, time.monotonic() + timeout, False
    while True:
        b = client.get(f"/apps/{app}/releases/{number}/build", offset=offset)
        if b["output"]:
            click.echo(b["output"], nl=False, err=True)
        offset = b["offset"]
        if b["status"] == "succeeded" and not b["output"]:
            if b.get("reused_from"):
                click.echo(f"v{number} runs the slug of v{b['reused_from']} (same code: no "
                           f"build)", err=True)
            return
        if b["status"] == "failed" and not b["output"]:
            raise ClientError(f"v{number} failed to build: {b['reason']} (nothing of it was "
                              f"placed; `tally builds:output -a {app} v{number}`)")
        if b["status"] == "pending" and not said_waiting:
            said_waiting = True
            click.echo("waiting for a builder (`tally serve builder`) to take the build",
                       err=True)
        if time.monotonic() > deadline:
            raise ClientError(f"the build of v{number} is still {b['status']} after "
                              f"{timeout:.0f}s (is a builder running?)")
        if not b["output"]:
            time.sleep(0.3)


def register(cli: click.Group) -> None:
    from tally.cli_apps import app_option, emit, http_command, table

    @http_command(cli, "builds", json_output=True)
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

    @http_command(cli, "builds:output")
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
