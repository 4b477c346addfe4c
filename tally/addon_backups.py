"""The backups of apps' databases as the API offers them (api/services.py AddonBackups):
the backup agent's code run on the API host, which holds the repository and reaches the
apps' cluster. Failures become the API's answers: a cluster that cannot be reached or a
dump that fails is a 503 naming the cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tally.config import Config


class PlatformAddonBackups:
    """AddonBackups over this machine's repository, ledger and apps' cluster."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def _agent(self) -> Any:
        from agents.backups import gfs
        from agents.backups.jobs import BackupAgent
        from agents.backups.repository import Repository

        return BackupAgent(self.cfg.cluster(), Repository(self.cfg.backup_repo).open(),
                           self.cfg.backup_scratch, gfs.Policy(),
                           apps_cluster=self.cfg.apps_cluster(), redis_dir=self.cfg.redis_dir)

    def list(self, app: str, kind: str = "postgresql") -> list[dict[str, Any]]:
        from agents.backups.jobs import addon_target, redis_target
        from agents.backups.state import fold, stream_of
        from ledger import Ledger

        target = redis_target(app) if kind == "redis" else addon_target(app)
        with Ledger(self.cfg.cluster().dsn("tally_writer"), retry_deadline=10) as ledger:
            events = ledger.read_stream(stream_of(target))
        return [b.as_dict() for b in fold(events).values()]

    def capture(self, app: str, actor: str) -> dict[str, Any]:
        import psycopg2

        from agents.backups.base import BackupError
        from api.errors import Unavailable
        from ledger import ClusterError

        try:
            backup_id = self._agent().run_addon(app, None, job="capture",
                                                reason=f"capture by {actor}"[:200])
        except (BackupError, ClusterError, psycopg2.Error, OSError) as exc:
            raise Unavailable(f"the backup could not be taken: {exc}") from exc
        found = [b for b in self.list(app) if b["backup_id"] == backup_id]
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

    def restore(self, app: str, backup_id: str) -> None:
        import psycopg2

        from agents.backups.base import BackupError
        from api.errors import Unavailable
        from ledger import ClusterError

        try:
            self._agent().restore_addon(app, backup_id)
        except (BackupError, ClusterError, psycopg2.Error, OSError) as exc:
            raise Unavailable(f"the restore failed: {exc}") from exc

    def file(self, app: str, backup_id: str) -> Path:
        from agents.backups.repository import Repository

        return Repository(self.cfg.backup_repo).dump(app, backup_id)
