"""`tally serve ...`: run one of tally's daemons in the foreground. The control plane's
daemons are here (they sit beside the ledger); the fleet hosts' are in serve_fleet.py and
serve_balancer.py."""

from __future__ import annotations

import logging

import click
import psycopg2

from tally.commands import backups, serve_balancer, serve_fleet
from tally.config import Config
from tally.console import daemon_logging, fail_cleanly, parse_age, stop_event


@click.group()
def serve() -> None:
    """Run one of tally's daemons in the foreground. Operator commands: run on the host
    they serve (TALLY_HOME), not over the API."""


@serve.command("retention")
@click.option("--every", default="5m", show_default=True, help="Time between runs.")
@click.option("--older-than", default="1h", show_default=True,
              help="Heartbeats older than this are deleted (each host keeps its newest).")
@click.option("--samples-older-than", default="7d", show_default=True,
              help="Instance and router samples (tally stats) older than this are deleted.")
@click.pass_obj
@fail_cleanly
def serve_retention(cfg: Config, every: str, older_than: str,
                    samples_older_than: str) -> None:
    """Apply the heartbeat retention policy on a schedule; each run is recorded as a
    RetentionApplied event (see `tally ledger status`). Also delete the stats samples
    (agents' and balancers') past their age: `tally stats` reads a week at most."""
    from agents.stats import SampleStore
    from ledger import Ledger, LedgerError
    from ledger.retention import RetentionPolicy, apply

    daemon_logging()
    period, policy = parse_age(every), RetentionPolicy("heartbeat", parse_age(older_than))
    samples_age = parse_age(samples_older_than)
    stop = stop_event()
    log = logging.getLogger("tally.retention")
    samples = SampleStore(cfg.cluster().dsn("tally_owner"), "tally-retention")
    with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
        while not stop.is_set():
            try:
                deleted = apply(cfg.cluster().dsn("tally_owner"), ledger, policy)
                log.info("removed %d heartbeats older than %s", deleted, older_than)
                gone = samples.prune(samples_age)
                log.info("removed samples older than %s: %s", samples_older_than,
                         ", ".join(f"{n} from {table}" for table, n in gone.items()))
            except (LedgerError, psycopg2.Error) as exc:
                log.warning("retention run failed, trying at the next: %s", exc)
            stop.wait(period.total_seconds())


@serve.command("addons")
@click.option("--every", default="10s", show_default=True, help="Time between rounds.")
@click.option("--grace", default="60s", show_default=True,
              help="An add-on destroyed this recently is left to the API dropping it.")
@click.pass_obj
@fail_cleanly
def serve_addons(cfg: Config, every: str, grace: str) -> None:
    """Retry the drops of destroyed add-ons that failed (their databases and Redis servers
    on this machine, the API's), each recorded as AddonDropped once done; hold every add-on
    database to its app's database_mb quota (read-only past it, refused past 1.25 times
    it: agents/dbsize.py)."""
    from datetime import UTC, datetime
    from functools import partial

    from agents.addonreaper import Reaper
    from ledger import Ledger, LedgerError
    from tally.api_settings import database_watcher, drop_addon

    daemon_logging()
    period = parse_age(every)
    stop = stop_event()
    log = logging.getLogger("tally.addons")
    with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
        reaper = Reaper(ledger, partial(drop_addon, cfg), grace=parse_age(grace))
        sizes = None
        while not stop.is_set():
            try:
                reaper.tick(datetime.now(UTC))
                sizes = sizes or database_watcher(cfg, ledger)
                if sizes is not None:
                    sizes.tick()
            except (LedgerError, psycopg2.Error) as exc:
                log.warning("add-ons round failed, trying at the next: %s", exc)
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
    run(cfg.cluster().dsn("tally_owner"), cfg.relays, projectors.ALL, stop=stop,
        poll_interval=poll_interval, batch=batch)


@serve.command("placer")
@click.option("--ttl", default=15.0, show_default=True, envvar="TALLY_HOST_TTL",
              help="Seconds without a heartbeat before a host is lost.")
@click.option("--suspect-after", default=5.0, show_default=True,
              help="Seconds without a heartbeat before a host gets nothing new.")
@click.option("--deploy-timeout", default=120.0, show_default=True,
              envvar="TALLY_DEPLOY_TIMEOUT",
              help="Seconds a new release has to become healthy before it fails.")
@click.option("--interval", default=1.0, show_default=True,
              help="Seconds between reconciles when no wake-up comes.")
@click.pass_obj
@fail_cleanly
def serve_placer(cfg: Config, ttl: float, suspect_after: float, deploy_timeout: float,
                 interval: float) -> None:
    """Place app instances on alive hosts, replace lost ones, roll releases out."""
    from agents.placement import Settings
    from agents.placer import Placer
    from ledger import Ledger

    daemon_logging()
    if not 0 < suspect_after < ttl:
        raise click.BadParameter("must be above 0 and below --ttl",
                                 param_hint="--suspect-after")
    stop = stop_event()
    settings = Settings(ttl=ttl, suspect_after=suspect_after,
                        deploy_timeout=deploy_timeout)
    with Ledger(cfg.cluster().dsn("tally_writer")) as ledger:
        Placer(ledger, settings).run(stop, cfg.relays, interval)


@serve.command("collector")
@click.option("--bind", help="ZeroMQ PULL endpoint (default: TALLY_COLLECTOR).")
@click.option("--chunk-mb", default=1.0, show_default=True,
              help="Rotate an app's current log file past this size.")
@click.option("--keep-chunks", default=100, show_default=True, type=click.IntRange(min=1),
              help="Chunks an app keeps (the oldest go): its logs hold at most this many "
                   "times --chunk-mb.")
@click.pass_obj
@fail_cleanly
def serve_collector(cfg: Config, bind: str | None, chunk_mb: float, keep_chunks: int) -> None:
    """Receive app logs from the host agents and write them to chunked files per app.
    Serves CURVE with its keypair ($TALLY_HOME/secrets/collector.curve): admits only the
    keys hosts registered and the control plane's (balancers' access logs); a host's lines
    only for the instances and runs placed on it (agents/placed.py)."""
    from agents.logs import Collector
    from agents.placed import Placed
    from ledger import curve
    from ledger.cluster import ClusterError

    daemon_logging()
    stop = stop_event()
    try:
        dsn: str | None = cfg.cluster().dsn("tally_writer")
    except ClusterError as exc:
        logging.getLogger("tally.collector").warning(
            "%s: admitting only the control plane's key, no host's", exc)
        dsn = None
    cfg.collector_key()  # its keypair, made on first use
    control = curve.load_or_create(cfg.secret("control.curve")).public
    keys = (curve.load_or_create(cfg.secret("collector.curve")), curve.Allowed({control}, dsn))
    placed = Placed(dsn, {control.decode()}, keys[1].registered) if dsn else None
    Collector(cfg.app_logs_dir, int(chunk_mb * 2**20), keep_chunks,
              placed.admits if placed else None).run(bind or cfg.collector, stop, curve=keys)


@serve.command("api")
@click.option("--bind", envvar="TALLY_API_BIND", default="127.0.0.1:8000",
              show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--threads", default=4, show_default=True,
              help="Threads per worker for requests other than attached runs.")
@click.option("--run-slots", default=8, show_default=True,
              help="Attached runs (`tally run`) each worker relays at once, each on a thread "
                   "of its own beyond --threads; more are refused with a 503.")
def serve_api(bind: str, workers: int, threads: int, run_slots: int) -> None:
    """The JSON API under gunicorn."""
    import dataclasses

    from api import create_app
    from api.serve import Gunicorn, options
    from tally.api_settings import api_settings

    try:
        settings = api_settings(Config.from_env())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot configure the API: {exc}") from exc
    # long-polls may hold half the threads at most: the rest keep answering
    settings = dataclasses.replace(settings, long_poll_slots=max(1, threads // 2),
                                   run_slots=max(1, run_slots))
    settings.bundles_dir.mkdir(parents=True, exist_ok=True)
    settings.bundles_dir.chmod(0o700)  # every app's code: not for apps on this machine
    # an attached run holds its thread throughout: they get threads of their own
    Gunicorn(create_app(settings), options(bind, workers, threads + settings.run_slots)).run()


for command in (serve_fleet.serve_agent, serve_fleet.serve_builder,
                serve_balancer.serve_balancer, serve_balancer.serve_acme,
                backups.serve_backups):
    serve.add_command(command)

COMMANDS = [serve]
