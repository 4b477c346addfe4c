"""The API wired to this platform (`tally serve api`): the ledger, the bundle store, the
app log files, the apps' database cluster for add-ons."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from api.services import Settings
from ledger.cluster import Cluster
from tally.config import Config, run_key_from_env


def addon_database(cluster: Cluster, app: str) -> str:
    """The app's add-on database in the apps cluster (made and started on first use): an
    existing one is the API's 409, a cluster that cannot be made or reached its 503."""
    import psycopg2

    from agents import addons
    from api.errors import Conflict, Unavailable
    from ledger import ClusterError

    try:
        addons.ensure_cluster(cluster)
        return addons.create_database(cluster, app)
    except addons.AddonError as exc:
        raise Conflict(str(exc)) from exc
    except (ClusterError, psycopg2.Error, OSError) as exc:
        raise Unavailable(f"the apps' database cluster is not available: {exc}") from exc


def api_settings(cfg: Config) -> Settings:
    """The API wired to this platform: the ledger, the bundle store, the app log files."""
    from agents import logs

    def tail(app: str, lines: int) -> list[str]:
        return logs.tail(cfg.app_logs_dir, app, lines)

    def follow(app: str, stop: threading.Event) -> Iterator[str]:
        return logs.follow(cfg.app_logs_dir, app, stop, idle=True)

    def create_database(app: str) -> str:
        return addon_database(cfg.apps_cluster(), app)

    return Settings(dsn=cfg.cluster().dsn("tally_writer"), bundles_dir=cfg.bundles_dir,
                    max_bundle_bytes=cfg.max_bundle_bytes, app_uids=cfg.app_uids,
                    logs_tail=tail, logs_follow=follow,
                    web_port=cfg.web_port, run_key=run_key_from_env(),
                    create_database=create_database, build_logs_dir=cfg.build_logs_dir)
