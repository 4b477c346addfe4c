"""`tally why`, `events` (-f), `state --at`, `diff`: the platform's history, over the API
only (so they work from any machine with the API's URL and a token)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import click

from tally.client import Client, ClientError
from tally.commands.args import app_and_arg, check_app
from tally.commands.http import emit, http_command
from tally.console import cell, parse_since, table

FOLLOW_WAIT_S = 10.0
"""`events -f` long-polls the API this long per request."""


@http_command("why", json_output=True)
@click.option("-a", "--app", "app", envvar="TALLY_APP", help="The app (or TALLY_APP).")
@click.argument("app_arg", metavar="[APP]", required=False)
def why(client: Client, app: str | None, app_arg: str | None, as_json: bool) -> None:
    """Explain, from the ledger, why the app is or is not serving: `tally why -a blog`
    (or `tally why blog`)."""
    name = app_and_arg(app, app_arg)
    emit(client.get(f"/apps/{name}/why"), as_json, _print_why)


@http_command("events")
@click.option("-a", "--app", "app", envvar="TALLY_APP",
              help="The app's events (its people may read them; without -a: the whole "
              "ledger, admins only).")
@click.option("--stream", help="One stream, e.g. app-blog.")
@click.option("--category", help="One category, e.g. app, host, instance.")
@click.option("--type", "type_", help="One event type, e.g. InstanceExited.")
@click.option("--since", help="Recorded at or after: ISO time, or an age like 10m, 2h.")
@click.option("--after", type=int, help="Only events after this position.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000),
              help="At most this many (the latest, unless --after).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--show-secrets", is_flag=True, help="Show config values (redacted by "
              "default).")
def events(client: Client, app: str | None, stream: str | None, category: str | None,
           type_: str | None, since: str | None, after: int | None, limit: int,
           follow: bool, as_json: bool, show_secrets: bool) -> None:
    """Read the ledger, human-readable or as JSON lines: `tally events -a blog -f`.
    Config values are redacted unless --show-secrets."""
    path = f"/apps/{check_app(app)}/events" if app else "/events"
    try:
        when = parse_since(since, datetime.now(UTC)).isoformat() if since else None
    except ValueError as exc:
        raise ClientError(str(exc)) from exc
    params: dict[str, Any] = {
        "stream": stream, "category": category, "type": type_, "limit": limit,
        "show_secrets": str(show_secrets).lower(), "since": when}
    try:
        page = client.get(path, **params, after=after or 0,
                          newest="false" if after is not None else "true")
        _print_events(page["events"], as_json)
        cursor = page["head"]  # the ledger's head (newest), or where the scan stopped
        while follow:
            asked = time.monotonic()
            page = client.get(path, **params, after=cursor, wait=FOLLOW_WAIT_S)
            _print_events(page["events"], as_json)
            cursor = page["head"]
            if not page["events"] and time.monotonic() - asked < 0.5:
                time.sleep(0.5)  # the API answered without waiting (busy): do not spin
    except KeyboardInterrupt:
        pass


@http_command("state", json_output=True)
@click.option("--at", "position", type=int, required=True, help="Ledger position.")
@click.option("--view", help="One view (apps, releases, hosts, placements, instances, "
              "routes, routes_version, backups).")
def state(client: Client, position: int, view: str | None, as_json: bool) -> None:
    """The views as they were at a ledger position, replayed by the same projectors
    (admins)."""
    views = client.get("/state", at=position, view=view)["views"]
    if as_json:
        click.echo(json.dumps(views, indent=1))
        return
    for name, rows in views.items():
        click.echo(f"{name} at position {position}:")
        table(rows, empty="  (no rows)", width=40)


@http_command("diff", json_output=True)
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option("--view", help="One view only.")
def diff(client: Client, a: int, b: int, view: str | None, as_json: bool) -> None:
    """What changed in each view between ledger positions A and B (admins)."""
    changes = client.get("/diff", a=a, b=b, view=view)["views"]
    if as_json:
        click.echo(json.dumps(changes, indent=1))
        return
    _print_diff(changes, *sorted((a, b)))


def _print_why(w: dict[str, Any]) -> None:
    click.echo(w["summary"])
    for f in w["findings"]:
        cited = sorted(set(f["positions"]))
        where = (f" [position{'s' if len(cited) > 1 else ''} "
                 f"{', '.join(map(str, cited))}]") if cited else ""
        click.echo(("- " if f["problem"] else "  ") + f["text"] + where)


def _print_events(events: list[dict[str, Any]], as_json: bool) -> None:
    for e in events:
        if as_json:
            click.echo(json.dumps(e, sort_keys=True))
            continue
        data = ", ".join(f"{k}={cell(v, 60)}" for k, v in e["data"].items())
        at = e["recorded_at"][:19].replace("T", " ")
        click.echo(f"{e['position']:>8}  {at}  {e['stream']:<28} {e['type']:<18} {data}")


def _print_diff(changes: dict[str, Any], lo: int, hi: int) -> None:
    quiet = True
    for name, d in changes.items():
        if not any(d.values()):
            continue
        quiet = False
        click.echo(f"{name}:")
        for row in d["added"]:
            click.echo(f"  + {json.dumps(row)}")
        for row in d["removed"]:
            click.echo(f"  - {json.dumps(row)}")
        for c in d["changed"]:
            what = ", ".join(f"{k}: {cell(o, 30)} -> {cell(n, 30)}"
                             for k, (o, n) in c["changes"].items())
            click.echo(f"  ~ {'/'.join(map(str, c['key']))}: {what}")
    if quiet:
        click.echo(f"no view changed between positions {lo} and {hi}")


COMMANDS = [why, events, state, diff]
