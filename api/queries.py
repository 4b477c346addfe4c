"""Every read of the projectors' views (schema `views`, migrations/versions/0002_views.py)
in one module, so a change of their columns is fixed here only."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg2

from ledger import Ledger, LedgerUnavailable
from ledger.vocabulary import LIVENESS_STREAM, liveness_of
from projectors.hosts import host_state


def rows(ledger: Ledger, sql: str, params: Sequence[Any] = (),
         shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
         ) -> list[dict[str, Any]]:
    """Run a view query; rows as JSON-ready dicts (times as ISO strings), each passed
    through `shape` first if given."""
    try:
        with ledger.connection().cursor() as cur:
            cur.execute(sql, params)
            names = [c.name for c in cur.description]
            raw = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        ledger.close()
        raise LedgerUnavailable(f"views unreachable: {str(exc).strip()}") from exc
    return [{n: _plain(v) for n, v in (shape(r) if shape else r).items()} for r in raw]


def _plain(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, str | int | float | bool | list | dict) or v is None:
        return v
    return json.loads(json.dumps(v, default=str))


def apps(ledger: Ledger) -> list[dict[str, Any]]:
    return rows(ledger, "SELECT name, owner, current_release AS release, scale, domains, "
                        "maintenance, config_version, created_at FROM views.apps ORDER BY name")


def hosts(ledger: Ledger) -> list[dict[str, Any]]:
    """Every host, its state as of now: the view stores alive/lost; suspect (missed
    heartbeats) depends on the clock, so it is derived here, by the one rule, with the
    timings the placer announced."""
    now = datetime.now(UTC)
    liveness = liveness_of(ledger.read_stream(LIVENESS_STREAM))

    def shape(r: dict[str, Any]) -> dict[str, Any]:
        r["state"] = host_state(r, now, liveness)
        del r["registered_at"]
        return r
    return rows(ledger, "SELECT host_id, address, port_min, port_max, capacity, memory_mb, "
                        "state, last_heartbeat, registered_at, load, memory_used_mb, "
                        "running_instances, lost_reason FROM views.hosts ORDER BY host_id",
                shape=shape)


def placements(ledger: Ledger, app: str | None = None,
               host_id: str | None = None) -> list[dict[str, Any]]:
    return rows(ledger, "SELECT instance_id, app, release, process_type, host_id, port, "
                        "placed_at FROM views.placements WHERE (%s::text IS NULL OR app = %s) "
                        "AND (%s::text IS NULL OR host_id = %s) ORDER BY app, instance_id",
                (app, app, host_id, host_id))


def placed_on(ledger: Ledger, app: str, release: int, host_id: str) -> bool:
    """Whether the placer put an instance of this release on this host (bundle access)."""
    return bool(rows(ledger, "SELECT 1 FROM views.placements WHERE app = %s AND release = %s "
                             "AND host_id = %s LIMIT 1", (app, release, host_id)))


def on_host(ledger: Ledger, instance_id: str, host_id: str) -> bool:
    """Whether the instance is placed on this host or still runs there: the only instances
    whose events that host's agent may report."""
    return bool(rows(ledger, "SELECT 1 FROM views.placements WHERE instance_id = %s AND "
                             "host_id = %s UNION ALL SELECT 1 FROM views.instances WHERE "
                             "instance_id = %s AND host_id = %s LIMIT 1",
                     (instance_id, host_id, instance_id, host_id)))


def instances(ledger: Ledger, app: str | None = None) -> list[dict[str, Any]]:
    return rows(ledger, "SELECT instance_id, app, release, process_type, host_id, port, "
                        "state, pid, since, exit_code, signal, restarts, log_tail, "
                        "reason FROM views.instances WHERE (%s::text IS NULL OR app = %s) "
                        "ORDER BY app, process_type, instance_id", (app, app))


def routes(ledger: Ledger, app: str | None = None) -> list[dict[str, Any]]:
    return rows(ledger, "SELECT hostname, app, backends, maintenance, version FROM views.routes "
                        "WHERE (%s::text IS NULL OR app = %s) ORDER BY hostname", (app, app))


def backups(ledger: Ledger) -> list[dict[str, Any]]:
    return rows(ledger, "SELECT target, last_ok_backup_id, last_ok_at, last_failure_backup_id, "
                        "last_failure_at, last_failure_error, retained FROM views.backups "
                        "ORDER BY target")


def stats(ledger: Ledger, app: str, minutes: int) -> dict[str, Any]:
    """An app's traffic and resources over the last `minutes`, from the agents' samples
    (stats.instance_samples): per instance the requests served, the latest memory and
    restart count, and CPU use (CPU seconds are cumulative per process tree, so a sample
    below the one before marks a restart and is left out); for the app, totals and
    requests per minute."""
    window = "app = %s AND at > now() - make_interval(mins => %s)"
    instances = rows(ledger, f"""
        WITH s AS (
            SELECT instance_id, host_id, at, requests, restarts, memory_bytes,
                   cpu_seconds - lag(cpu_seconds) OVER w AS cpu,
                   extract(epoch FROM at - lag(at) OVER w) AS seconds,
                   row_number() OVER (PARTITION BY instance_id ORDER BY at DESC) AS newest
            FROM stats.instance_samples WHERE {window}
            WINDOW w AS (PARTITION BY instance_id ORDER BY at))
        SELECT instance_id, max(host_id) AS host_id, sum(requests)::bigint AS requests,
               max(memory_bytes) FILTER (WHERE newest = 1) AS memory_bytes,
               max(restarts) FILTER (WHERE newest = 1) AS restarts,
               round((100 * sum(cpu) FILTER (WHERE cpu >= 0)
                      / nullif(sum(seconds) FILTER (WHERE cpu >= 0), 0))::numeric, 1)::float
                   AS cpu_percent,
               max(at) AS last_sample_at
        FROM s GROUP BY instance_id ORDER BY instance_id""", (app, minutes))
    series = rows(ledger, f"""
        SELECT date_trunc('minute', at) AS minute, sum(requests)::bigint AS requests
        FROM stats.instance_samples WHERE {window} GROUP BY 1 ORDER BY 1""", (app, minutes))
    total = sum(i["requests"] for i in instances)
    return {"app": app, "minutes": minutes, "instances": instances, "series": series,
            "requests": total, "requests_per_minute": round(total / minutes, 1),
            "memory_bytes": sum(i["memory_bytes"] or 0 for i in instances)}
