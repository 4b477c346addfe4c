"""The build part of `tally deploy`: a release's build output as it comes (polled from the
API), as `git push heroku` shows it, then its outcome."""

from __future__ import annotations

import time

import click

from tally.client import Client, ClientError


def follow_build(client: Client, app: str, number: int, timeout: float,
                 unclaimed_timeout: float | None = None) -> None:
    """Print the build's output until it ends; a failed build exits 1 with its reason.
    A build no builder has taken within `unclaimed_timeout` (the deploy's own --timeout)
    ends the wait at once: with no builder running, waiting for a build's `timeout` helps
    no one."""
    start = time.monotonic()
    offset, deadline, said_waiting = 0, start + timeout, False
    unclaimed_deadline = start + (timeout if unclaimed_timeout is None else unclaimed_timeout)
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
        now = time.monotonic()
        if now > deadline or (b["status"] == "pending" and now > unclaimed_deadline):
            waited = (deadline if now > deadline else unclaimed_deadline) - start
            raise ClientError(f"the build of v{number} is still {b['status']} after "
                              f"{waited:.0f}s (is a builder running?)")
        if not b["output"]:
            time.sleep(0.3)
