"""The rollout part of `tally deploy`: a release followed until the placer says it is
deployed or failed, its instances' progress printed as it comes."""

from __future__ import annotations

import time

import click

from tally.client import Client, ClientError
from tally.console import cell

ROLLOUT = ("ReleaseDeployed", "ReleaseFailed", "PlacementFailed")


def follow(client: Client, app: str, number: int, timeout: float) -> None:
    """Follow release `number` until the placer says it is deployed (every wanted instance
    healthy) or failed (with its reason), printing instance progress; or time out saying
    what it still waits for."""
    scale = client.get(f"/apps/{app}")["scale"]
    wanted = sum(scale.values())
    if wanted == 0:
        click.echo(f"v{number} released; no process is scaled up (`tally scale web=1`)",
                   err=True)
        return
    click.echo(f"waiting for {wanted} instance(s) of v{number} to be healthy "
               f"({cell(scale)}): placed by the placer, started by host agents", err=True)
    deadline = time.monotonic() + timeout
    cursor, seen, said = 0, "", set()
    while True:
        asked = time.monotonic()
        page = client.get(f"/apps/{app}/events", after=cursor, type=list(ROLLOUT),
                          wait=min(2.0, max(0.0, deadline - asked)))
        if not page["events"] and time.monotonic() - asked < 0.5:
            time.sleep(0.5)  # the API answered without waiting (busy): do not spin
        cursor = page["head"]
        for e in page["events"]:
            if e["data"].get("release") != number:
                continue
            if e["type"] == "ReleaseDeployed":
                click.echo(f"v{number} is deployed: every wanted instance is healthy", err=True)
                return
            if e["type"] == "ReleaseFailed":
                if e["data"].get("output"):  # a release phase: its output, as Heroku shows it
                    click.echo(f"-----> Release phase of v{number} failed; its output (last "
                               f"{len(e['data']['output'])} lines):", err=True)
                    for line in e["data"]["output"]:
                        click.echo(phase_line(line), err=True)
                serving = [r["number"] for r in client.get(f"/apps/{app}/releases")["releases"]
                           if r.get("status") == "deployed"]
                still = (f" (v{serving[0]} keeps serving)" if serving else
                         " (nothing of the app was serving before: nothing serves now)")
                raise ClientError(f"v{number} failed to deploy: {e['data']['reason']}{still}")
            if e["data"]["reason"] not in said:
                said.add(e["data"]["reason"])
                click.echo(f"  the placer cannot place every instance yet: "
                           f"{e['data']['reason']}", err=True)
        rows = [r for r in client.get(f"/apps/{app}/ps")["items"] if r["release"] == number]
        progress = ", ".join(f"{r['process_type']} {r['state']}" for r in rows)
        if progress and progress != seen:
            seen = progress
            click.echo(f"  instances: {progress}", err=True)
        if time.monotonic() >= deadline:
            healthy = sum(1 for r in rows if r["state"] == "healthy")
            states = cell(sorted({r["state"] for r in rows})) if rows else "none placed"
            raise ClientError(
                f"v{number} is released but not running after {timeout:.0f}s: {healthy} of "
                f"{wanted} healthy, instances: {states} (are the placer and a host agent "
                f"running? `tally why {app}`)")


def phase_line(line: str) -> str:
    """A release phase's output line as `tally deploy` shows it: the agent's (`tally: `,
    agents/processes.py: tail) as the platform's `----->` lines, the app's indented under
    them (its `app: ` dropped), as Heroku shows a release phase; an app's own `tally: ...`
    line stays indented."""
    if line.startswith("tally: "):
        return f"-----> {line.removeprefix('tally: ')}"
    return f"       {line.removeprefix('app: ')}"
