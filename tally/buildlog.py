"""The build part of `tally deploy`: a release's build output as it comes (polled from the
API), as `git push heroku` shows it, then its outcome."""

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
