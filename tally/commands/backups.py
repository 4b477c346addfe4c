"""`tally serve backups` (the backup agent; serve.py adds it to `tally serve`), `tally
backups` (what was taken, checked, failed, pruned), `tally backups:capture`,
`tally backups:restore` and `backups:restore-addon`. Operator commands: run on a ledger host
(TALLY_HOME, the repository), not over the API."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from tally.config import Config
from tally.console import daemon_logging, fail_cleanly, parse_age, stop_event, table

DEFAULT_LEDGER_CRON = "0 * * * *"
DEFAULT_ADDONS_CRON = "30 3 * * *"
DEFAULT_KEEP = "hourly=24,daily=7,weekly=4,monthly=12"


class Meter:
    """Progress on stderr for long work: a percentage and MB, rewritten in place at most
    every half second (only on a terminal, else a line every 10%)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.shown = 0.0
        self.last_tenth = -1
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / total if total else 0.0
        now = time.monotonic()
        if self.tty and now - self.shown >= 0.5:
            click.echo(f"\r{self.what}: {pct:5.1f}% ({done / 1e6:,.1f} of {total / 1e6:,.1f} "
                       f"MB)", nl=False, err=True)
            self.shown = now
        elif not self.tty and int(pct // 10) > self.last_tenth:
            self.last_tenth = int(pct // 10)
            click.echo(f"{self.what}: {pct:.0f}% ({done / 1e6:,.1f} of {total / 1e6:,.1f} MB)",
                       err=True)

    def done(self) -> None:
        if self.tty:
            click.echo("", err=True)


def agent_for(cfg: Config, keep: str = DEFAULT_KEEP, max_rate: str | None = None,
              progress: Any = None, keep_final: str = "30d") -> Any:
    """The backup agent wired to this machine's clusters and repository."""
    from agents.backups import gfs
    from agents.backups.jobs import BackupAgent
    from agents.backups.repository import Repository

    cluster = cfg.cluster()
    cluster.require()
    return BackupAgent(cluster, Repository(cfg.backup_repo).open(), cfg.backup_scratch,
                       gfs.Policy.parse(keep), apps_cluster=cfg.apps_cluster(),
                       max_rate=max_rate, progress=progress,
                       keep_final=parse_age(keep_final), redis_dir=cfg.redis_dir)


def _backup_error() -> type[Exception]:
    from agents.backups.base import BackupError

    return BackupError


@click.command("backups")
@click.option("--ledger", "ledger_cron", default=DEFAULT_LEDGER_CRON, show_default=True,
              help="When to take a base backup of the ledger (cron, UTC; 6 fields: "
                   "seconds first).")
@click.option("--addons", "addons_cron", default=DEFAULT_ADDONS_CRON, show_default=True,
              help="When to dump every app's database (cron, UTC).")
@click.option("--keep", default=DEFAULT_KEEP, show_default=True,
              help="GFS retention per target.")
@click.option("--keep-final", default="30d", show_default=True,
              help="How long the last backup of a destroyed add-on is kept.")
@click.option("--max-rate", help="Limit pg_basebackup's rate (e.g. 32M).")
@click.pass_obj
@fail_cleanly
def serve_backups(cfg: Config, ledger_cron: str, addons_cron: str, keep: str,
                  keep_final: str, max_rate: str | None) -> None:
    """The backup agent: scheduled base backups of the ledger and dumps of the apps'
    databases, each verified, GFS retention, and the WAL archive."""
    from agents.backups.schedule import Daemon, Job

    jobs = [Job("ledger", ledger_cron), Job("addons", addons_cron)]
    for job in jobs:
        job.trigger()  # a bad cron line is an error now, not at 3 a.m.
    daemon_logging()
    daemon = Daemon(agent_for(cfg, keep, max_rate, keep_final=keep_final), jobs,
                    cfg.wal_spool)
    stop_event(daemon.stop)
    daemon.run()

@click.command("backups")
@click.option("--target", help="Only this target (`ledger`, `addon:APP`, `redis:APP`).")
@click.option("--all", "show_all", is_flag=True, help="Pruned and failed ones too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
@fail_cleanly
def backups_list(cfg: Config, target: str | None, show_all: bool, as_json: bool) -> None:
    """The backups the ledger records, oldest first: state (running, completed,
    verified, failed, pruned), size, position, error."""
    from agents.backups import walcheck
    from agents.backups.jobs import starts
    from agents.backups.repository import Repository
    from agents.backups.state import TYPES, fold
    from ledger import Ledger

    with Ledger(cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
        ledger.sequence()
        backups = fold(ledger.read_all(types=TYPES, limit=None)).values()
    rows = [b.as_dict() for b in backups if (target is None or b.target == target)
            and (show_all or b.state not in ("pruned",))]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    table(rows, ["backup_id", "target", "state", "started_at", "size_bytes",
                 "duration_s", "position", "events", "error"], empty="(no backups)")
    repo = Repository(cfg.backup_repo)
    if target in (None, "ledger") and repo.wal_dir.is_dir():
        line = walcheck.summary(repo.wal_segments(), starts(backups))
        if "MISSING" in line:  # a gap in point-in-time recovery: monitoring must see it
            raise click.ClickException(line)
        click.echo(line)


@click.command("backups:capture")
@click.option("--target", default="ledger", show_default=True,
              help="`ledger`, `addon:APP` for an app's database, `redis:APP` for its Redis.")
@click.option("--max-rate", help="Limit pg_basebackup's rate (e.g. 32M).")
@click.pass_obj
@fail_cleanly
def backups_capture(cfg: Config, target: str, max_rate: str | None) -> None:
    """Take a backup now (with progress), verify it and apply retention."""
    meter = Meter("base backup")
    agent = agent_for(cfg, max_rate=max_rate, progress=meter)
    agent.recover()
    if target == "ledger":
        backup_id = agent.run_ledger(None, job="capture", reason="capture")
    elif target.startswith("addon:"):
        backup_id = agent.run_addon(target.removeprefix("addon:"), None, job="capture")
    elif target.startswith("redis:"):
        backup_id = agent.run_redis(target.removeprefix("redis:"), None, job="capture")
    else:
        raise click.BadParameter("must be `ledger`, `addon:APP` or `redis:APP`",
                                 param_hint="--target")
    meter.done()
    _report(agent, backup_id)

@click.command("backups:restore")
@click.option("--at", "at", help="A time (ISO 8601, e.g. 2026-12-06T09:30:00Z) or a "
              "ledger position (a whole number); default: the end of the archive.")
@click.option("--into", "into", required=True, type=click.Path(file_okay=False),
              help="A new data folder (must not exist, or be empty).")
@click.option("--backup", "backup_id", help="Start from this base backup (default: the "
              "newest verified one before --at).")
@click.option("--check", is_flag=True, help="Then count and digest the restored events "
              "(comparable with the live ledger's; a full read of them).")
@click.pass_obj
@fail_cleanly
def backups_restore(cfg: Config, at: str | None, into: str, backup_id: str | None,
                    check: bool) -> None:
    """Build a new ledger data folder from the repository: the base backup, then the
    archived WAL up to --at (point in time), with progress. The live ledger is not
    touched; start the folder with PostgreSQL 15's pg_ctl."""
    from pathlib import Path

    from agents.backups import restore
    from agents.backups.repository import Repository

    target = restore.parse_target(at)
    meter = Meter("restoring")
    try:
        result = restore.restore(Repository(cfg.backup_repo), Path(into), target,
                                 cfg.cluster(), backup_id, meter,
                                 lambda line: click.echo(line, err=True), check)
    except _backup_error() as exc:
        raise click.ClickException(str(exc)) from exc
    meter.done()
    click.echo(json.dumps(result.as_dict(), indent=1))


@click.command("backups:restore-addon")
@click.argument("app")
@click.option("--kind", type=click.Choice(["postgresql", "redis"]), default="postgresql",
              show_default=True, help="Which add-on: the app's database or its Redis.")
@click.option("--backup", "backup_id", help="This backup (default: the newest verified).")
@click.option("--confirm", help="The app's name again, to go ahead without a prompt.")
@click.pass_obj
@fail_cleanly
def backups_restore_addon(cfg: Config, app: str, kind: str, backup_id: str | None,
                          confirm: str | None) -> None:
    """Restore APP's database (or Redis) from its backup, in place: a database's tables in
    the backup are dropped and made again (in one transaction); a Redis is stopped, given
    the RDB and started (the steps are shown)."""
    from tally import platform, supervise

    what = "Redis" if kind == "redis" else "database"
    if confirm != app:
        if not sys.stdin.isatty():
            raise click.ClickException(f"this overwrites {app}'s {what}: pass "
                                       f"--confirm {app}")
        click.confirm(f"Overwrite {app}'s {what} from its backup?", abort=True)
    agent = agent_for(cfg)
    try:
        if kind == "redis":
            used = agent.restore_redis(app, backup_id, "operator",
                                       platform.redis_launch(cfg, supervise.running(cfg)),
                                       lambda line: click.echo(f"  {line}", err=True))
        else:
            used = agent.restore_addon(app, backup_id)
    except _backup_error() as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Restored {app}'s {what} from {used}", err=True)


def _report(agent: Any, backup_id: str | None) -> None:
    from agents.backups.state import fold

    if backup_id is None:
        raise click.ClickException("another backup agent is taking this backup")
    with agent.ledger() as ledger:
        ledger.sequence()
        from agents.backups.state import TYPES

        b = fold(ledger.read_all(types=TYPES, limit=None)).get(backup_id)
    if b is None or b.state != "verified":
        raise click.ClickException(f"{backup_id} failed: {b.failed if b else 'not recorded'}")
    d = b.as_dict()
    click.echo(f"{backup_id}: verified, {d['size_bytes'] / 1e6:,.1f} MB in "
               f"{d['duration_s']:.1f}s, position {d['position']}, {d['events']} events",
               err=True)


COMMANDS = [backups_list, backups_capture, backups_restore, backups_restore_addon]
