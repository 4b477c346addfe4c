"""The API wired to this platform (`tally serve api`): the ledger, the bundle store, the
app log files, the apps' database cluster for add-ons."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

from api.services import Settings
from ledger.cluster import Cluster
from tally.addon_backups import PlatformAddonBackups
from tally.config import Config, run_key_from_env, seal_key_from_env

if TYPE_CHECKING:
    from agents.dbsize import Watcher
    from ledger import Ledger


def addon_database(cluster: Cluster, app: str) -> str:
    """The app's add-on database in the apps cluster (made and started on first use): an
    existing one is the API's 409, a cluster that cannot be made or reached its 503."""
    from agents import addons

    with _addon_errors():
        addons.ensure_cluster(cluster)
        return addons.create_database(cluster, app)


@contextmanager
def _addon_errors() -> Iterator[None]:
    """The add-on services' failures as the API's answers: 409 if it exists, else 503."""
    import psycopg2

    from agents import addons, redisaddon
    from api.errors import Conflict, Unavailable
    from ledger import ClusterError

    try:
        yield
    except (addons.AddonError, redisaddon.RedisError) as exc:
        if "already has" in str(exc):
            raise Conflict(str(exc)) from exc
        raise Unavailable(str(exc)) from exc
    except (ClusterError, psycopg2.Error, OSError) as exc:
        raise Unavailable(f"the apps' database cluster is not available: {exc}") from exc


def create_addon(cfg: Config, kind: str, app: str, plan: str) -> tuple[str, str]:
    """Make an app's add-on of `kind`: its URL and where it runs. Under `tally up` its
    services are supervisord's programs (tally/platform.py: ADDONS_PART)."""
    from agents import appsdb, redisaddon
    from tally import platform, supervise

    supervised = supervise.running(cfg)
    if kind == "redis":
        with _addon_errors():
            return redisaddon.create(cfg.redis_dir, app, plan, cfg.redis_ports,
                                     platform.redis_launch(cfg, supervised))
    cluster = platform.apps_cluster(cfg, supervised)
    url = addon_database(cluster, app)
    host, port = appsdb.address(cluster)
    return url, f"{host}:{port}"


def destroy_addon(cfg: Config, kind: str, app: str) -> None:
    """Drop an app's add-on of `kind` (idempotent): its credentials open nothing after.
    The API takes the final backup before it calls this (api/routes_apps.py `gone`)."""
    from agents import addons, redisaddon
    from tally import platform, supervise

    supervised = supervise.running(cfg)
    with _addon_errors():
        if kind == "redis":
            redisaddon.destroy(cfg.redis_dir, app, platform.redis_launch(cfg, supervised))
            return
        cluster = platform.apps_cluster(cfg, supervised)
        if cluster.initialized():
            addons.ensure_cluster(cluster)
            addons.drop_database(cluster, app)


def database_watcher(cfg: Config, ledger: Ledger) -> Watcher | None:
    """The add-on databases' size watcher (agents/dbsize.py), each held to its app's
    database_mb quota; None while no add-on made the apps' cluster."""
    from agents import addons, dbsize, notices
    from api import quotas
    from ledger import curve

    cluster = cfg.apps_cluster()
    if not cluster.initialized():
        return None

    def limit_of(app: str) -> int:
        def quota(subject: str, name: str) -> quotas.Quota:
            events = ledger.read_stream(quotas.stream(subject, name))
            return quotas.fold(subject, [e.data for e in events[-1:]])
        created = ledger.read_stream(f"app-{app}", limit=1)
        owner = created[0].data.get("owner") or "" if created else ""
        return quotas.database_mb(quota("app", app), quota("user", owner))

    def say(app: str, line: str) -> None:
        client = curve.Client(cfg.collector_key(), curve.load_or_create(
            cfg.secret("control.curve")))  # as the control plane (the balancers' key)
        if not notices.send(cfg.collector, client, app, "addon.postgresql", line):
            dbsize.log.warning("the collector did not take %s's notice: %s", app, line)

    return dbsize.Watcher(lambda: addons.superuser(cluster), limit_of, say)


def drop_addon(cfg: Config, kind: str, app: str) -> None:
    """The final backup, then the drop, as the API's route does: the add-ons' reaper's
    retry of a drop that failed (agents/addonreaper.py)."""
    PlatformAddonBackups(cfg, cfg.cluster().dsn("tally_writer")).final(app, kind)
    destroy_addon(cfg, kind, app)


def api_settings(cfg: Config) -> Settings:
    """The API wired to this platform: the ledger, the bundle store, the app log files."""
    from agents import logs

    def tail(app: str, lines: int) -> list[str]:
        return logs.tail(cfg.app_logs_dir, app, lines)

    def follow(app: str, stop: threading.Event) -> Iterator[str]:
        return logs.follow(cfg.app_logs_dir, app, stop, idle=True)

    dsn = cfg.cluster().dsn("tally_writer")
    return Settings(dsn=dsn, bundles_dir=cfg.bundles_dir,
                    max_bundle_bytes=cfg.max_bundle_bytes, app_uids=cfg.app_uids,
                    logs_tail=tail, logs_follow=follow,
                    web_port=cfg.web_port, run_key=run_key_from_env(),
                    seal_key=seal_key_from_env(),
                    create_addon=partial(create_addon, cfg),
                    destroy_addon=partial(destroy_addon, cfg),
                    build_logs_dir=cfg.build_logs_dir,
                    addon_backups=PlatformAddonBackups(cfg, dsn))
