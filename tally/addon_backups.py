"""The backups of apps' add-ons (PostgreSQL dumps, Redis RDBs) as the API offers them
(api/services.py AddonBackups): the backup agent's code run on the API host, which holds
the repository, reaches the apps' cluster and runs the Redis servers. Events go to the
ledger the API itself writes to (its DSN, given), so nothing here needs the ledger's
cluster on this machine. Failures become the API's answers: a cluster that cannot be
reached or a dump that fails is a 503 naming the cause."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tally.config import Config

KINDS = ("postgresql", "redis")


class PlatformAddonBackups:
    """AddonBackups over this machine's repository and add-ons, recorded in `dsn`."""

    def __init__(self, cfg: Config, dsn: str) -> None:
        self.cfg = cfg
        self.dsn = dsn

    def _agent(self) -> Any:
        from agents.backups import gfs
        from agents.backups.jobs import BackupAgent
        from agents.backups.repository import Repository

        return BackupAgent(self.cfg.cluster(), Repository(self.cfg.backup_repo).open(),
                           self.cfg.backup_scratch, gfs.Policy(),
                           apps_cluster=self.cfg.apps_cluster(), redis_dir=self.cfg.redis_dir,
                           dsn=self.dsn)

    def list(self, app: str, kind: str = "postgresql") -> list[dict[str, Any]]:
        from agents.backups.jobs import addon_target, redis_target
        from agents.backups.state import fold, stream_of
        from ledger import Ledger

        target = redis_target(app) if kind == "redis" else addon_target(app)
        with Ledger(self.dsn, retry_deadline=10) as ledger:
            events = ledger.read_stream(stream_of(target))
        return [{**b.as_dict(), "kind": kind} for b in fold(events).values()]

    def capture(self, app: str, actor: str, kind: str = "postgresql") -> dict[str, Any]:
        from api.errors import Unavailable

        with _unavailable("the backup could not be taken"):
            agent = self._agent()
            run = agent.run_redis if kind == "redis" else agent.run_addon
            backup_id = run(app, None, job="capture", reason=f"capture by {actor}"[:200])
        found = [b for b in self.list(app, kind) if b["backup_id"] == backup_id]
        if not found or found[0]["state"] != "verified":
            error = found[0]["error"] if found else "not recorded"
            raise Unavailable(f"the backup {backup_id} failed: {error}")
        return found[0]

    def final(self, app: str, kind: str = "postgresql") -> str | None:
        """The last backup of the app's database (or Redis) before it is dropped (its id;
        None when there is none). Raises AddonError, so nothing is dropped, if it fails."""
        from agents.addons import AddonError
        from agents.backups.base import BackupError

        agent = self._agent()
        what = "Redis" if kind == "redis" else "database"
        run = agent.run_redis if kind == "redis" else agent.run_addon
        if app not in (agent.redis_apps() if kind == "redis" else agent.addon_apps()):
            return None
        try:
            backup_id = run(app, None, job="final",
                            reason="final, before the add-on was destroyed")
        except BackupError as exc:
            raise AddonError(f"the final backup of {app}'s {what} failed, so it was not "
                             f"dropped: {exc}") from exc
        found = [b for b in self.list(app, kind) if b["backup_id"] == backup_id]
        if not found or found[0]["state"] != "verified":
            raise AddonError(f"the final backup of {app}'s {what} failed, so it was not "
                             f"dropped: {found[0]['error'] if found else 'not recorded'}")
        return backup_id

    def restore(self, app: str, backup: dict[str, Any], actor: str,
                say: Callable[[str], None] = lambda _line: None) -> None:
        """Restore the app's add-on of the backup's kind from it, in place; `say` hears
        each step (a Redis restore's copy and load)."""
        from tally import platform, supervise

        with _unavailable("the restore failed"):
            agent = self._agent()
            if backup["kind"] == "redis":
                launch = platform.redis_launch(self.cfg, supervise.running(self.cfg))
                agent.restore_redis(app, backup["backup_id"], actor, launch, say)
            else:
                say(f"pg_restore of {backup['backup_id']} into {app}'s database")
                agent.restore_addon(app, backup["backup_id"], actor)

    def file(self, app: str, backup: dict[str, Any]) -> Path:
        from agents.backups.repository import Repository

        repo = Repository(self.cfg.backup_repo)
        if backup["kind"] == "redis":
            return repo.rdb(app, backup["backup_id"])
        return repo.dump(app, backup["backup_id"])


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """The backup agent's failures as the API's 503, naming the cause."""
    import psycopg2

    from agents.backups.base import BackupError
    from api.errors import Unavailable
    from ledger import ClusterError

    try:
        yield
    except (BackupError, ClusterError, psycopg2.Error, OSError) as exc:
        raise Unavailable(f"{what}: {exc}") from exc
