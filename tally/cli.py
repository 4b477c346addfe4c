"""The `tally` command line: quiet on success, one clear line and a non-zero exit on failure."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import psycopg2

import migrations
from ledger.errors import LedgerError
from tally import (
    cli_agents,
    cli_apps,
    cli_balancer,
    cli_builds,
    cli_history,
    cli_runs,
    cli_sim,
    cli_state,
    platform,
    supervise,
    systemd,
)
from tally.config import Config
from tally.console import daemon_logging, fail_cleanly, parse_age, stop_event, table


@click.group()
@click.pass_context
def cli(ctx: click.Context) -> None:
    """tally: push Python web apps; tally builds, runs, routes and remembers them."""
    ctx.obj = cfg = Config.from_env()
    if cfg.relay_key and cfg.curve_keyfile:  # this process's subscribers speak CURVE
        from ledger import curve

        curve.use(curve.Client(cfg.relay_key.encode(),
                               curve.load_or_create(Path(cfg.curve_keyfile))))


# --- the ledger cluster ---------------------------------------------------------------------


@cli.group()
def ledger() -> None:
    """The replicated PostgreSQL ledger: a primary and a synchronous standby. Operator
    commands: run on a ledger host (TALLY_HOME), not over the API."""


@ledger.command("init")
@click.pass_obj
@fail_cleanly
def ledger_init(cfg: Config) -> None:
    """Create both nodes, the roles and the schema, and start them."""
    cluster = cfg.cluster()
    click.echo(f"creating the ledger cluster in {cluster.root} ...", err=True)
    cluster.init()
    migrations.upgrade(cluster.dsn("tally_owner"))


@ledger.command("start")
@click.pass_obj
@fail_cleanly
def ledger_start(cfg: Config) -> None:
    """Start both nodes (primary first) and bring the schema up to date."""
    cluster = cfg.cluster()
    cluster.start()
    migrations.upgrade(cluster.dsn("tally_owner"))


@ledger.command("stop")
@click.option("--node", type=click.Choice(["a", "b"]), help="Stop one node only.")
@click.option("--mode", type=click.Choice(["smart", "fast", "immediate"]), default="fast")
@click.pass_obj
@fail_cleanly
def ledger_stop(cfg: Config, node: str | None, mode: str) -> None:
    """Stop the cluster (the standby first), or one node."""
    cluster = cfg.cluster()
    if node:
        cluster.stop_node(node, mode)
    else:
        cluster.stop()


@ledger.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@fail_cleanly
def ledger_status(cfg: Config, as_json: bool) -> None:
    """Each node's role, replication state, sync state and lag, the ledger's size (and
    Patroni's view: leader, members, timeline, lag, when the cluster runs under Patroni)."""
    from ledger.patroni import PatroniCluster, describe

    cluster = cfg.cluster()
    nodes = cluster.status()
    size = _ledger_size(cfg)
    patroni = None
    if isinstance(cluster, PatroniCluster):
        try:
            patroni = cluster.state()
        except LedgerError as exc:
            patroni = {"error": str(exc)}
    if as_json:
        plain = [{**n.as_dict(), **({"ledger": size} if n.role == "primary" else {})}
                 for n in nodes]
        click.echo(json.dumps(plain if patroni is None else {"patroni": patroni,
                                                             "nodes": plain}, indent=1))
        return
    for line in describe(patroni) if patroni is not None else []:
        click.echo(line)
    if size is not None:
        click.echo(f"ledger {size['bytes'] / 2**20:.1f} MiB, ~{size['events_estimate']:,} "
                   f"events")
        for category, r in size["retention"].items():
            click.echo(f"  retention of {category}: {r['deleted_total']:,} removed in "
                       f"{r['runs']} runs" + (f", last {r['last_run_at']} ({r['last_deleted']:,}"
                                              f" older than {r['older_than_s']:.0f}s)"
                                              if r["runs"] else " (tally serve retention)"))
    for n in nodes:
        click.echo(f"node {n.name}  port {n.port}  {n.role}")
        for r in n.replication:
            lag = r["replay_lag_s"]
            click.echo(f"  -> {r['standby']}: {r['state']}, {r['sync_state']}, "
                       f"{r['lag_bytes']} bytes behind"
                       + (f", replay lag {lag * 1000:.1f} ms" if lag is not None else ""))
        if n.role == "standby":
            delay = "n/a" if n.replay_delay_s is None else f"{n.replay_delay_s:.1f}s"
            click.echo(f"  received {n.receive_lsn}, replayed {n.replay_lsn}, "
                       f"last replayed commit {delay} ago")


def _ledger_size(cfg: Config) -> dict | None:
    """The ledger's size and what retention removed (None: no primary answers)."""
    import psycopg2

    from ledger import Ledger, LedgerError
    from ledger.retention import status

    try:
        with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=2) as ledger:
            return status(ledger)
    except (LedgerError, psycopg2.Error):  # a stopped cluster: status says so per node
        return None


@ledger.command("promote")
@click.option("--node", type=click.Choice(["a", "b"]), help="Node to promote (the standby).")
@click.pass_obj
@fail_cleanly
def ledger_promote(cfg: Config, node: str | None) -> None:
    """Promote the standby. Refused while the old primary still runs. Under Patroni: a
    switchover to the synchronous standby (or --node)."""
    from ledger.patroni import PatroniCluster

    cluster = cfg.cluster()
    promoted = cluster.promote(node)
    if isinstance(cluster, PatroniCluster):
        click.echo(f"Patroni switched the leadership over to node {promoted}", err=True)
        return
    click.echo(f"node {promoted} is now the primary (running without a synchronous standby "
               f"until `tally ledger rejoin` brings the other node back)", err=True)


@ledger.command("rejoin")
@click.argument("node", type=click.Choice(["a", "b"]))
@click.pass_obj
@fail_cleanly
def ledger_rejoin(cfg: Config, node: str) -> None:
    """Rewind a former primary and make it the synchronous standby again. Under Patroni
    (which rewinds a former primary by itself): rebuild the replica from the leader."""
    cfg.cluster().rejoin(node)


@ledger.command("prune")
@click.option("--category", default="heartbeat", show_default=True,
              help="Stream category to prune (high-volume observed state only).")
@click.option("--older-than", default="24h", show_default=True, help="e.g. 90s, 15m, 24h, 7d")
@click.pass_obj
@fail_cleanly
def ledger_prune(cfg: Config, category: str, older_than: str) -> None:
    """Delete old heartbeats (each stream keeps its newest event). Prints how many."""
    from ledger.retention import DEFAULT_POLICIES, RetentionPolicy, prune

    if category not in DEFAULT_POLICIES:
        raise ValueError(f"only {', '.join(DEFAULT_POLICIES)} events may be pruned; "
                         f"{category} is history tally keeps")
    deleted = prune(cfg.cluster().dsn("tally_owner"), RetentionPolicy(category,
                                                                      parse_age(older_than)))
    click.echo(f"pruned {deleted} {category} events older than {older_than}", err=True)


# --- daemons --------------------------------------------------------------------------------




@cli.group()
def serve() -> None:
    """Run one of tally's daemons in the foreground. Operator commands: run on the host
    they serve (TALLY_HOME), not over the API."""


@serve.command("retention")
@click.option("--every", default="5m", show_default=True, help="Time between runs.")
@click.option("--older-than", default="1h", show_default=True,
              help="Heartbeats older than this are deleted (each host keeps its newest).")
@click.pass_obj
@fail_cleanly
def serve_retention(cfg: Config, every: str, older_than: str) -> None:
    """Apply the heartbeat retention policy on a schedule; each run is recorded as a
    RetentionApplied event (see `tally ledger status`)."""
    from ledger import Ledger, LedgerError
    from ledger.retention import RetentionPolicy, apply

    daemon_logging()
    period, policy = parse_age(every), RetentionPolicy("heartbeat", parse_age(older_than))
    stop = stop_event()
    log = logging.getLogger("tally.retention")
    with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
        while not stop.is_set():
            try:
                deleted = apply(cfg.cluster().dsn("tally_owner"), ledger, policy)
                log.info("removed %d heartbeats older than %s", deleted, older_than)
            except (LedgerError, psycopg2.Error) as exc:
                log.warning("retention run failed, trying at the next: %s", exc)
            stop.wait(period.total_seconds())


@serve.command("relay")
@click.option("--endpoint", help="ZeroMQ PUB endpoint to bind (default: the first relay).")
@click.option("--poll-interval", default=1.0, show_default=True, help="Seconds.")
@click.option("--curve", "use_curve", is_flag=True,
              help="Serve CURVE: admit only the control plane's key ($TALLY_HOME/secrets/"
              "control.curve) and the keys hosts registered (relay keypair: relay.curve).")
@click.pass_obj
@fail_cleanly
def serve_relay(cfg: Config, endpoint: str | None, poll_interval: float,
                use_curve: bool) -> None:
    """LISTEN on the ledger primary, sequence new events, PUB wake-ups."""
    from ledger import curve
    from ledger.relay import Relay

    daemon_logging()
    dsn = cfg.cluster().dsn("tally_writer")
    keys = None
    if use_curve:
        control = curve.load_or_create(cfg.secret("control.curve"))
        keys = (curve.load_or_create(cfg.secret("relay.curve")),
                curve.Allowed({control.public}, dsn))
    relay = Relay(dsn, endpoint or cfg.relays[0], poll_interval=poll_interval, curve=keys)
    stop_event(relay.stop)
    relay.run()


@serve.command("watchdog")
@click.option("--limit", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a session may hold a transaction id on the ledger cluster.")
@click.option("--interval", type=click.FloatRange(min=0.05),
              help="Seconds between looks (default: a quarter of the limit, at most 1).")
@click.pass_obj
@fail_cleanly
def serve_watchdog(cfg: Config, limit: float, interval: float | None) -> None:
    """End any ledger-cluster session holding a transaction id past the limit; record each
    change of ledger leader."""
    from agents.watchdog import Watchdog
    from ledger.cluster import NODES

    daemon_logging()
    cluster = cfg.cluster()
    nodes = {port: name for name, port in zip(NODES, cluster.spec.ports, strict=True)}
    dog = Watchdog(cluster.dsn("postgres"), cluster.dsn("tally_writer"), limit, interval,
                   nodes)
    stop_event(dog.stop)
    dog.run()


# --- the whole platform on this machine -------------------------------------------------------


@cli.command("up")
@click.pass_obj
@fail_cleanly
def up(cfg: Config) -> None:
    """Bring up everything built so far on this machine, and print where it is. Operator
    command: runs on a ledger host (TALLY_HOME), not over the API."""
    platform.close_home(cfg)
    cluster = cfg.cluster()
    if not cluster.initialized():
        click.echo(f"creating the ledger cluster in {cluster.root} ...", err=True)
        cluster.init()
    cluster.start()
    migrations.upgrade(cluster.dsn("tally_owner"))
    suffix = platform.platform_suffix(cfg, platform.UP_SUFFIX, if_unset=True)
    supervise.up(cfg, platform.programs(cfg), supervise.base_environment())
    platform.wait_ready(cfg)
    click.echo("tally is up (daemons under supervisord; `tally status` shows them):")
    for n in cluster.status():
        click.echo(f"  ledger node {n.name}: {n.role} on {cluster.spec.host}:{n.port}")
    pids = {d["name"]: d["pid"] for d in supervise.status(cfg)}
    for name, _, where in platform.daemons(cfg):
        click.echo(f"  {name}: {where} (pid {pids.get(name)})")
    click.echo(f"  apps answer at http://<app>.{suffix}/ (tally admin suffix to change it)")
    click.echo(f"  logs: {cfg.log_dir} (rotated)   stop with: tally down")
    for line in platform.unconfined():
        click.echo(line)
    for line in cli_apps.first_admin(cfg):
        click.echo(line)


@cli.command("down")
@click.pass_obj
@fail_cleanly
def down(cfg: Config) -> None:
    """Stop every daemon `tally up` started and supervisord, then the apps' database
    cluster (add-ons start it) and the ledger cluster. Operator command: runs on a ledger
    host (TALLY_HOME), not over the API."""
    supervise.down(cfg)
    for cluster in (cfg.apps_cluster(), cfg.cluster()):
        if cluster.initialized():
            cluster.stop()


@cli.command("status")
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


@cli.command("systemd-units")
@click.option("--user", default="root", show_default=True,
              help="The user the daemons run as (the agent needs root to run apps as "
              "their own users).")
@click.pass_obj
@fail_cleanly
def systemd_units(cfg: Config, user: str) -> None:
    """Print the systemd units a production host runs tally's daemons with."""
    click.echo(systemd.render(platform.programs(cfg, secrets=False), user), nl=False)


# Each part's commands live in its own module and register here.
cli_state.register(cli)
cli_apps.register(cli)
cli_agents.register(cli)
cli_balancer.register(cli)
cli_runs.register(cli)
cli_sim.register(cli)
cli_history.register(cli)
cli_builds.register(cli)


def main() -> None:
    cli(prog_name="tally")


if __name__ == "__main__":
    sys.exit(main())
