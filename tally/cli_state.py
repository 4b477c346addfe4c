"""`tally` commands for the platform's derived state: the projectors daemon, its status
and rebuilds, replay (`state --at`, `diff`), the ledger's events, and `why`.

They talk to the database directly for now; the functions they call (projectors.replay,
projectors.inspect, projectors.rebuild) take a DSN and return plain values, for the HTTP
API to expose too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
import psycopg2

from ledger.payloads import redacted
from ledger.store import head_of
from tally.config import Config
from tally.console import cell, daemon_logging, fail_cleanly, parse_since, stop_event, table


def _dsn(cfg: Config, role: str = "tally_reader") -> str:
    return cfg.cluster().dsn(role)


def _dump(value: Any) -> str:
    from projectors.replay import jsonable

    return json.dumps(jsonable(value), indent=1, sort_keys=False)


def register(cli: click.Group) -> None:
    """Add this module's commands to the `tally` group."""
    serve = cli.commands["serve"]
    assert isinstance(serve, click.Group)

    @serve.command("projectors")
    @click.option("--poll-interval", default=1.0, show_default=True,
                  help="Seconds between polls when no wake-up comes.")
    @click.option("--batch", default=5000, show_default=True, help="Events per transaction.")
    @click.pass_obj
    @fail_cleanly
    def serve_projectors(cfg: Config, poll_interval: float, batch: int) -> None:
        """Run every projector: catch up from the checkpoints, then follow the ledger."""
        import projectors
        from projectors.runtime import serve as run

        daemon_logging()
        stop = stop_event()
        run(_dsn(cfg, "tally_owner"), cfg.relays, projectors.ALL, stop=stop,
            poll_interval=poll_interval, batch=batch)

    @cli.group("projectors")
    def projectors_group() -> None:
        """The projectors that turn events into views: status and rebuilds."""

    @projectors_group.command("status")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @fail_cleanly
    def projectors_status(cfg: Config, as_json: bool) -> None:
        """Each projector's position, lag behind the head, and the error that stopped it."""
        from projectors.inspect import status

        rows = status(_dsn(cfg))
        if as_json:
            click.echo(_dump(rows))
            return
        click.echo(f"{'projector':<12} {'position':>9} {'head':>9} {'behind':>7} "
                   f"{'seconds':>8}  state")
        for r in rows:
            secs = "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f}"
            click.echo(f"{r['name']:<12} {r['position']:>9} {r['head']:>9} "
                       f"{r['lag_events']:>7} {secs:>8}  {r['state']}")
            if r["error"]:
                e = r["error"]
                click.echo(f"{'':<12} stopped at position {e['position']} ({e['type']}): "
                           f"{e['message']}")

    @projectors_group.command("rebuild")
    @click.argument("name")
    @click.pass_obj
    @fail_cleanly
    def projectors_rebuild(cfg: Config, name: str) -> None:
        """Rebuild NAME's views (or `all`) from position zero beside the live ones, then
        swap: readers never see an empty view."""
        import projectors
        from projectors.rebuild import rebuild

        chosen = list(projectors.ALL) if name == "all" else [projectors.by_name(name)]
        position = rebuild(_dsn(cfg, "tally_owner"), chosen)
        views = ", ".join(v for p in chosen for v in p.public)
        click.echo(f"rebuilt {name} ({views}) up to position {position}", err=True)

    @cli.command("state")
    @click.option("--at", "position", type=int, required=True, help="Ledger position.")
    @click.option("--view", help="One view (apps, releases, hosts, placements, instances, "
                  "routes, routes_version, backups).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @fail_cleanly
    def state(cfg: Config, position: int, view: str | None, as_json: bool) -> None:
        """The views as they were at a ledger position, replayed by the same projectors."""
        from projectors.replay import state_at

        views = state_at(_dsn(cfg), position, view)
        if as_json:
            click.echo(_dump(views))
            return
        for name, rows in views.items():
            click.echo(f"{name} at position {position}:")
            table(rows, empty="  (no rows)", width=40)

    @cli.command("diff")
    @click.argument("a", type=int)
    @click.argument("b", type=int)
    @click.option("--view", help="One view only.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @fail_cleanly
    def diff_cmd(cfg: Config, a: int, b: int, view: str | None, as_json: bool) -> None:
        """What changed in each view between positions A and B."""
        from projectors.replay import diff, jsonable

        changes = diff(_dsn(cfg), a, b, view)
        if as_json:
            click.echo(_dump(changes))
            return
        lo, hi = sorted((a, b))
        quiet = True
        for name, d in changes.items():
            if not any(d.values()):
                continue
            quiet = False
            click.echo(f"{name}:")
            for row in d["added"]:
                click.echo(f"  + {json.dumps(jsonable(row), default=str)}")
            for row in d["removed"]:
                click.echo(f"  - {json.dumps(jsonable(row), default=str)}")
            for c in d["changed"]:
                what = ", ".join(f"{k}: {cell(o, 30)} -> {cell(n, 30)}"
                                 for k, (o, n) in c["changes"].items())
                click.echo(f"  ~ {'/'.join(map(str, c['key']))}: {what}")
        if quiet:
            click.echo(f"no view changed between positions {lo} and {hi}")

    @cli.command("events")
    @click.option("--stream", help="One stream, e.g. app-blog.")
    @click.option("--category", help="One category, e.g. app, host, instance.")
    @click.option("--type", "type_", help="One event type, e.g. InstanceExited.")
    @click.option("--since", help="Recorded at or after: ISO time, or an age like 10m, 2h.")
    @click.option("--after", type=int, help="Only events after this position.")
    @click.option("--limit", default=100, show_default=True,
                  help="At most this many (the latest, unless --after).")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    @click.option("--show-secrets", is_flag=True, help="Show config values (redacted by "
                  "default).")
    @click.pass_obj
    @fail_cleanly
    def events_cmd(cfg: Config, stream: str | None, category: str | None, type_: str | None,
                   since: str | None, after: int | None, limit: int, follow: bool,
                   as_json: bool, show_secrets: bool) -> None:
        """Read the ledger, human-readable or as JSON lines. Config values are redacted
        unless --show-secrets."""
        from projectors.inspect import check_filters, describe, read_events

        check_filters(stream, category, type_)
        filters = {"stream": stream, "category": category, "type_": type_,
                   "since": parse_since(since, datetime.now(UTC)) if since else None}

        def show(conn: Any, after: int | None) -> int | None:
            batch = read_events(conn, after=after, limit=limit, **filters)
            for ev in batch:
                if not show_secrets:
                    ev = dataclasses.replace(ev, data=redacted(ev.type, ev.data))
                click.echo(json.dumps(ev.as_dict(), default=str) if as_json else describe(ev))
            return batch[-1].position if batch else after

        conn = psycopg2.connect(_dsn(cfg), application_name="tally-events")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:  # before the first page: what comes after is followed
                head = head_of(cur)
            last = show(conn, after)
            if follow:
                _follow(cfg, conn, head if last is None else last, show)
        except KeyboardInterrupt:
            pass
        finally:
            conn.close()

    @cli.command("why")
    @click.argument("app")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @click.pass_obj
    @fail_cleanly
    def why_cmd(cfg: Config, app: str, as_json: bool) -> None:
        """Explain, from the ledger, why APP is or is not serving."""
        from projectors.inspect import why

        _check_app(app)
        explanation = why(_dsn(cfg), app, datetime.now(UTC))
        if as_json:
            click.echo(_dump(explanation.as_dict()))
        else:
            for line in explanation.lines():
                click.echo(line)


def _check_app(name: str) -> None:
    from ledger.catalogue import APP_NAME

    if not APP_NAME.regex.match(name):
        raise ValueError(f"{name!r} is not an app name: it {APP_NAME.error}")


def _follow(cfg: Config, conn: Any, last: int,
            show: Callable[[Any, int | None], int | None]) -> None:
    """Print the events after `last` as they come: woken by the relays, polling every
    second anyway."""
    from ledger.subscriber import Subscriber

    sub = Subscriber(cfg.relays)
    try:
        while True:
            sub.wait(1.0)
            last = show(conn, last)
    finally:
        sub.close()
