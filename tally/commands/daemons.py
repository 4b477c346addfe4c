"""`tally up`, `down`, `status`, `systemd-units`: tally's daemons on this machine, under
supervisord (tally/supervise.py) or as systemd units (tally/systemd.py). Operator commands:
run on a ledger host (TALLY_HOME), not over the API."""

from __future__ import annotations

import json

import click

from tally import platform, supervise, systemd
from tally.config import Config
from tally.console import fail_cleanly, table


@click.command("up")
@click.pass_obj
@fail_cleanly
def up(cfg: Config) -> None:
    """Bring up everything built so far on this machine, and print where it is. Operator
    command: runs on a ledger host (TALLY_HOME), not over the API."""
    platform.close_home(cfg)
    cluster = platform.ledger_cluster(cfg)
    if not cluster.initialized():
        click.echo(f"creating the ledger cluster in {cluster.root} ...", err=True)
        cluster.init()
    cluster.start()
    import migrations  # alembic and SQLAlchemy: loaded only by the commands that migrate

    migrations.upgrade(cluster.dsn("tally_owner"))
    for line in platform.start_addons(cfg, supervised=True):
        click.echo(line, err=True)
    suffix = platform.platform_suffix(cfg, platform.UP_SUFFIX, if_unset=True)
    supervise.up(cfg, platform.programs(cfg), supervise.base_environment())
    platform.wait_ready(cfg)
    click.echo("tally is up (daemons under supervisord; `tally status` shows them):")
    for n in cluster.status():
        click.echo(f"  ledger node {n.name}: {n.role} on {cluster.spec.host}:{n.port}")
    pids = {d["name"]: d["pid"] for d in supervise.status(cfg)}
    for name in sorted(n for n in pids if n.startswith(f"{platform.LEDGER_PART}-")):
        click.echo(f"  {name}: the ledger's HA (tally ledger status) (pid {pids[name]})")
    for name, _, where in platform.daemons(cfg):
        click.echo(f"  {name}: {where} (pid {pids.get(name)})")
    click.echo(f"  apps answer at http://<app>.{suffix}/ (tally admin suffix to change it)")
    click.echo(f"  logs: {cfg.log_dir} (rotated)   stop with: tally down")
    for line in platform.unconfined():
        click.echo(line)
    admin = platform.first_admin(cfg)
    if admin:
        token, path = admin
        click.echo(f"  first admin: user `admin`, token {token}")
        click.echo(f"  (shown once; saved in {path}; more users: tally admin create-user)")


@click.command("down")
@click.pass_obj
@fail_cleanly
def down(cfg: Config) -> None:
    """Stop every daemon `tally up` started and supervisord, then the add-ons' services
    (the apps' database cluster, each app's Redis) and the ledger cluster. Operator
    command: runs on a ledger host (TALLY_HOME), not over the API."""
    supervise.down(cfg)
    platform.stop_addons(cfg)
    cluster = cfg.cluster()
    if cluster.initialized():
        cluster.stop()


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@fail_cleanly
def status(cfg: Config, as_json: bool) -> None:
    """The daemons `tally up` runs: state, pid, uptime, restarts after a crash."""
    rows = supervise.status(cfg)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table(rows, ["name", "state", "pid", "uptime_s", "restarts", "last_exit"])


@click.command("systemd-units")
@click.option("--user", default="root", show_default=True,
              help="The user the daemons run as (the agent needs root to run apps as "
              "their own users).")
@click.pass_obj
@fail_cleanly
def systemd_units(cfg: Config, user: str) -> None:
    """Print the systemd units a production host runs tally's daemons with."""
    click.echo(systemd.render(platform.programs(cfg, secrets=False), user), nl=False)


COMMANDS = [up, down, status, systemd_units]
