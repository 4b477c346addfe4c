"""Reading the views (schema `views`, migrations/versions/0002_views.py): the one reader of
the projectors' tables for everyone else (the API's lists, bundle and event access
checks), so a change of their columns is fixed here only.

A `Views` holds its own connection (one per thread that uses it), apart from any ledger
connection: the views are derived data and may be served by another database later.
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg2

from ledger import LedgerUnavailable
from ledger.vocabulary import Liveness
from projectors.hosts import host_state
from projectors.store import PROJECTED

log = logging.getLogger("tally.views")

Row = dict[str, Any]


class Views:
    """Rows of the views as JSON-ready dicts (times as ISO strings)."""

    def __init__(self, dsn: str, application_name: str = "tally-views") -> None:
        self.dsn = dsn
        self.application_name = application_name
        self._local = threading.local()

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = psycopg2.connect(
                self.dsn, application_name=self.application_name)
            conn.autocommit = True
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def rows(self, sql: str, params: Sequence[Any] = (),
             shape: Callable[[Row], Row] | None = None) -> list[Row]:
        """Run a view query; each row passed through `shape` first if given."""
        try:
            with self._conn().cursor() as cur:
                cur.execute(sql, params)
                names = [c.name for c in cur.description]
                raw = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self.close()
            raise LedgerUnavailable(f"views unreachable: {str(exc).strip()}") from exc
        return [{n: plain(v) for n, v in (shape(r) if shape else r).items()} for r in raw]

    def apps(self) -> list[Row]:
        return self.rows("SELECT name, owner, current_release AS release, scale, domains, "
                         "maintenance, config_version, created_at FROM views.apps "
                         "ORDER BY name")

    def hosts(self, now: datetime, liveness: Liveness) -> list[Row]:
        """Every host, its state as of `now`: the view stores alive/lost; suspect (missed
        heartbeats) depends on the clock, so it is derived here by the one rule, with the
        timings the placer announced (ledger.vocabulary.liveness_of)."""
        def shape(r: Row) -> Row:
            r["state"] = host_state(r, now, liveness)
            del r["registered_at"]
            return r
        return self.rows("SELECT host_id, address, port_min, port_max, capacity, memory_mb, "
                         "state, last_heartbeat, registered_at, load, memory_used_mb, "
                         "running_instances, lost_reason FROM views.hosts ORDER BY host_id",
                         shape=shape)

    def placements(self, app: str | None = None, host_id: str | None = None) -> list[Row]:
        return self.rows("SELECT instance_id, app, release, process_type, host_id, port, "
                         "placed_at FROM views.placements WHERE (%s::text IS NULL OR app = %s) "
                         "AND (%s::text IS NULL OR host_id = %s) ORDER BY app, instance_id",
                         (app, app, host_id, host_id))

    def placed_on(self, app: str, release: int, host_id: str) -> bool:
        """Whether the placer put an instance of this release on this host (bundle
        access)."""
        return bool(self.rows("SELECT 1 FROM views.placements WHERE app = %s AND release = %s "
                              "AND host_id = %s LIMIT 1", (app, release, host_id)))

    def on_host(self, instance_id: str, host_id: str) -> bool:
        """Whether the instance is placed on this host or still runs there: the only
        instances whose events that host's agent may report."""
        return bool(self.rows("SELECT 1 FROM views.placements WHERE instance_id = %s AND "
                              "host_id = %s UNION ALL SELECT 1 FROM views.instances WHERE "
                              "instance_id = %s AND host_id = %s LIMIT 1",
                              (instance_id, host_id, instance_id, host_id)))

    def release_statuses(self, app: str) -> dict[int, tuple[str, str | None]]:
        """Each release's rollout status (pending, deployed, failed, superseded) and why it
        failed: config changes and rollbacks build on deployed releases only (w11)."""
        return {r["release"]: (r["status"], r["failure_reason"]) for r in self.rows(
            "SELECT release, status, failure_reason FROM views.releases WHERE app = %s",
            (app,))}

    def instances(self, app: str | None = None) -> list[Row]:
        return self.rows("SELECT instance_id, app, release, process_type, host_id, port, "
                         "state, pid, since, exit_code, signal, restarts, log_tail, reason "
                         "FROM views.instances WHERE (%s::text IS NULL OR app = %s) "
                         "ORDER BY app, process_type, instance_id", (app, app))

    def bundles_in_use(self, but: str) -> set[str]:
        """Bundle digests of every release of the live apps but `but` (being deleted)."""
        return {r["bundle_digest"] for r in self.rows(
            "SELECT DISTINCT bundle_digest FROM views.releases WHERE app <> %s", (but,))}

    def routes(self, app: str | None = None) -> list[Row]:
        return self.rows("SELECT hostname, app, backends, maintenance, version "
                         "FROM views.routes WHERE (%s::text IS NULL OR app = %s) "
                         "ORDER BY hostname", (app, app))

    ROUTE_COLUMNS = ("hostname, app, backends, maintenance, https_only, hsts, tls, challenges, "
                     "slug")
    """What a balancer routes by (balancer/sources.py reads rows of these keys)."""

    def routes_slug(self, app: str, release: int) -> bool:
        """Whether the routes name `release` of `app` as the slug balancers serve from."""
        return bool(self.rows("SELECT 1 FROM views.routes WHERE app = %s AND "
                              "(slug->>'release')::int = %s LIMIT 1", (app, release)))

    def routes_status(self) -> tuple[int, int]:
        """(ledger position the routes projector has applied, routes_version): one cheap
        query a balancer's wait polls."""
        row = self.rows(
            "SELECT (SELECT position FROM views.projector_checkpoints WHERE name = 'routes')"
            " AS checkpoint, (SELECT version FROM views.routes_version WHERE id = 1)"
            " AS version")[0]
        return row["checkpoint"] or 0, row["version"] or 0

    def routing(self) -> tuple[list[Row], int]:
        """Every route and the routes_version they make up, read in one snapshot."""
        rows = self.rows(
            f"SELECT v.version AS routes_version, {self.ROUTE_COLUMNS} FROM"
            " (SELECT max(version) AS version FROM views.routes_version) v"
            " LEFT JOIN views.routes r ON true ORDER BY hostname")
        version = rows[0]["routes_version"] or 0 if rows else 0
        return [{k: v for k, v in r.items() if k != "routes_version"} for r in rows
                if r["hostname"] is not None], version

    def backups(self) -> list[Row]:
        return self.rows("SELECT target, last_ok_backup_id, last_ok_at, "
                         "last_failure_backup_id, last_failure_at, last_failure_error, "
                         "retained FROM views.backups ORDER BY target")


class Projected:
    """Wakes this process's threads that wait for the projectors to move (a balancer's
    routing table waits for the routes projector to reach a position): one thread LISTENs
    to the projectors daemon's commits (store.PROJECTED) and counts them. Started on first
    use in each process (gunicorn forks its workers after the app is built).

    A waiter reads `seen()` before it checks the views, then `wait(seen, timeout)`: a commit
    between the two ends the wait at once. The timeout is the fallback while the listener
    is not connected (a commit then goes unheard)."""

    def __init__(self, dsn: str, application_name: str = "tally-views-listen") -> None:
        self.dsn, self.application_name = dsn, application_name
        self.generation = 0
        self.listening = False
        self._changed = threading.Condition()
        self._pid = 0
        self._start = threading.Lock()
        self._stop = threading.Event()

    def stop(self) -> None:
        """End the listener (within seconds)."""
        self._stop.set()

    def seen(self) -> int:
        if self._pid != os.getpid():
            with self._start:
                if self._pid != os.getpid():
                    self.listening = False
                    threading.Thread(target=self._run, name="projected", daemon=True).start()
                    self._pid = os.getpid()
        return self.generation

    def wait(self, seen: int, timeout: float) -> None:
        """Until a commit after `seen` (at once if one came already), or `timeout`."""
        with self._changed:
            if self.generation == seen:
                self._changed.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except psycopg2.Error as exc:
                log.warning("not woken by the projectors (%s); polling meanwhile",
                            str(exc).strip())
            self.listening = False
            self._stop.wait(1.0)

    def _listen(self) -> None:
        conn = psycopg2.connect(self.dsn, application_name=self.application_name)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {PROJECTED}")
            self._bump()  # what committed before LISTEN: waiters look again
            self.listening = True
            while not self._stop.is_set():
                select.select([conn], [], [], 1.0)
                conn.poll()
                if conn.notifies:
                    conn.notifies.clear()
                    self._bump()
        finally:
            conn.close()

    def _bump(self) -> None:
        with self._changed:
            self.generation += 1
            self._changed.notify_all()


def plain(v: Any) -> Any:
    """A value as JSON has it: times as ISO strings."""
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, str | int | float | bool | list | dict) or v is None:
        return v
    return json.loads(json.dumps(v, default=str))
