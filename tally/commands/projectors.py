"""`tally projectors status|rebuild`: the projectors that turn events into views. Operator
commands: they talk to the ledger database directly, so they run on a host that reaches it
(the user commands over the same history, `why`, `events`, `state`, `diff`, are
history.py: HTTP only). The daemon itself is `tally serve projectors` (serve.py)."""

from __future__ import annotations

import json
from typing import Any

import click

from tally.config import Config
from tally.console import fail_cleanly


def _dump(value: Any) -> str:
    from projectors.replay import jsonable

    return json.dumps(jsonable(value), indent=1, sort_keys=False)


@click.group("projectors")
def projectors_group() -> None:
    """The projectors that turn events into views: status and rebuilds. Operator
    commands: run on a ledger host (TALLY_HOME), not over the API."""


@projectors_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@fail_cleanly
def projectors_status(cfg: Config, as_json: bool) -> None:
    """Each projector's position, lag behind the head, and the error that stopped it."""
    from projectors.inspect import status

    rows = status(cfg.cluster().dsn("tally_reader"))
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
    position = rebuild(cfg.cluster().dsn("tally_owner"), chosen)
    views = ", ".join(v for p in chosen for v in p.public)
    click.echo(f"rebuilt {name} ({views}) up to position {position}", err=True)


COMMANDS = [projectors_group]
