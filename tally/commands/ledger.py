"""`tally ledger ...`: the replicated ledger cluster, for an operator on a ledger host."""

from __future__ import annotations

import json

import click

from ledger.errors import LedgerError
from tally import platform
from tally.config import Config
from tally.console import fail_cleanly, parse_age


@click.group()
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
    import migrations  # alembic and SQLAlchemy: loaded only by the commands that migrate

    migrations.upgrade(cluster.dsn("tally_owner"))


@ledger.command("start")
@click.pass_obj
@fail_cleanly
def ledger_start(cfg: Config) -> None:
    """Start both nodes (primary first) and bring the schema up to date."""
    cluster = platform.ledger_cluster(cfg) if platform.ledger_supervised(cfg) else cfg.cluster()
    cluster.start()
    import migrations

    migrations.upgrade(cluster.dsn("tally_owner"))


@ledger.command("stop")
@click.option("--node", type=click.Choice(["a", "b"]), help="Stop one node only.")
@click.option("--mode", type=click.Choice(["smart", "fast", "immediate"]), default="fast")
@click.pass_obj
@fail_cleanly
def ledger_stop(cfg: Config, node: str | None, mode: str) -> None:
    """Stop the cluster (the standby first), or one node."""
    if platform.ledger_supervised(cfg):
        raise click.ClickException("the ledger runs under `tally up`'s supervisor, which "
                                   "would start it again: `tally down` stops it")
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
    from ledger.retention import RetentionPolicy, prune

    policy = RetentionPolicy(category, parse_age(older_than))  # refused before any database
    deleted = prune(cfg.cluster().dsn("tally_owner"), policy)
    click.echo(f"pruned {deleted} {category} events older than {older_than}", err=True)


COMMANDS = [ledger]
