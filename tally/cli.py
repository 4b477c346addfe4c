"""The `tally` command line: quiet on success, one clear line and a non-zero exit on failure.

This module is the root group only; the commands are in tally/commands/, one module per
group of commands."""

from __future__ import annotations

from pathlib import Path

import click

from tally.commands import (
    addons,
    admin,
    apps,
    backups,
    builds,
    certs,
    daemons,
    history,
    ledger,
    logs,
    pg_backups,
    projectors,
    releases,
    runs,
    serve,
    session,
    settings,
    sim,
)
from tally.config import Config


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """tally: push Python web apps; tally builds, runs, routes and remembers them."""
    ctx.obj = cfg = Config.from_env()
    if cfg.relay_key and cfg.curve_keyfile:  # this process's subscribers speak CURVE
        from ledger import curve

        curve.use(curve.Client(cfg.relay_key.encode(),
                               curve.load_or_create(Path(cfg.curve_keyfile))))


for module in (ledger, serve, daemons, projectors, admin, session, apps, releases, settings,
               certs, runs, logs, addons, history, builds, sim,
               backups, pg_backups):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli(prog_name="tally")


if __name__ == "__main__":
    main()
