"""Read-side shells for the CLI (and later the HTTP API): list ledger events with filters,
the projectors' status and lag, and the events `why` reasons over. Each takes a DSN and
returns plain values."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg2

from ledger.catalogue import CATALOGUE, event_type, stream_category
from ledger.events import RecordedEvent
from ledger.store import COLUMNS, head_of, recorded
from ledger.vocabulary import LIVENESS_STREAM
from projectors import ALL
from projectors.why import Explanation, explain

_SELECT = f"SELECT {COLUMNS} FROM ledger.positions p JOIN ledger.events e ON e.id = p.event_id"


def check_filters(stream: str | None, category: str | None, type_: str | None) -> None:
    """Refuse filters that can match nothing because they are misspelt."""
    if stream is not None:
        stream_category(stream)
    categories = sorted({t.category for t in CATALOGUE.values()})
    if category is not None and category not in categories:
        raise ValueError(f"unknown category {category!r}; categories: {', '.join(categories)}")
    if type_ is not None:
        event_type(type_)


def read_events(conn: Any, *, after: int | None = None, stream: str | None = None,
                category: str | None = None, type_: str | None = None,
                since: datetime | None = None, limit: int = 1000) -> list[RecordedEvent]:
    """Sequenced events in ledger order, filtered: those after `after`, or without it the
    latest `limit` (like `git log`, but oldest first)."""
    if after is not None and after < 0:
        raise ValueError(f"position must be >= 0, not {after}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    where, args = ["p.position > %s"], [after or 0]
    for column, value in (("e.stream", stream), ("e.category", category), ("e.type", type_)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if since is not None:
        where.append("e.recorded_at >= %s")
        args.append(since)
    order = "ASC" if after is not None else "DESC"
    with conn.cursor() as cur:
        cur.execute(f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY p.position {order} "
                    "LIMIT %s", (*args, limit))
        events = [recorded(r) for r in cur.fetchall()]
    return events if after is not None else events[::-1]


def describe(event: RecordedEvent) -> str:
    """One line per event for people."""
    data = ", ".join(f"{k}={_short(v)}" for k, v in event.data.items())
    return (f"{event.position:>8}  {event.recorded_at:%Y-%m-%d %H:%M:%S}  "
            f"{event.stream:<28} {event.type:<18} {data}")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def status(dsn: str) -> list[dict[str, Any]]:
    """Each projector's checkpoint, state, error, and its lag measured now: events behind
    the head and seconds the oldest unapplied event has waited."""
    with psycopg2.connect(dsn, application_name="tally-status") as conn, conn.cursor() as cur:
        cur.execute(
            """WITH h AS (SELECT coalesce(max(position), 0) AS head FROM ledger.positions)
            SELECT c.name, c.position, c.state, h.head,
                   greatest(h.head - c.position, 0),
                   CASE WHEN h.head > c.position
                        THEN extract(epoch FROM clock_timestamp() - e.recorded_at) ELSE 0 END,
                   c.lag_seconds, c.updated_at, c.error_position, c.error_type, c.error_message
            FROM views.projector_checkpoints c CROSS JOIN h
            LEFT JOIN LATERAL (
                SELECT e.recorded_at FROM ledger.positions p
                JOIN ledger.events e ON e.id = p.event_id
                WHERE p.position > c.position ORDER BY p.position LIMIT 1) e ON true""")
        rows = {r[0]: r for r in cur.fetchall()}
        head = head_of(cur)
    conn.close()
    out = []
    for p in ALL:
        r = rows.get(p.name)
        if r is None:
            out.append({"name": p.name, "position": 0, "state": "never run", "head": head,
                        "lag_events": head, "lag_seconds": None, "recorded_lag_seconds": None,
                        "updated_at": None, "error": None})
            continue
        error = None if r[8] is None else {"position": r[8], "type": r[9], "message": r[10]}
        out.append({"name": p.name, "position": r[1], "state": r[2], "head": r[3],
                    "lag_events": r[4], "lag_seconds": float(r[5] or 0),
                    "recorded_lag_seconds": r[6], "updated_at": r[7], "error": error})
    return out


def why(dsn: str, app: str, now: datetime) -> Explanation:
    """Load what `why` needs (the app, its placements and instances, the hosts and their
    last heartbeats) and explain. One read-only snapshot: the answer's head is the head of
    what it read, and no event read later contradicts one read earlier."""
    with psycopg2.connect(dsn, application_name="tally-why") as conn:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        events = _streams(conn, [f"app-{app}", f"placement-{app}", LIVENESS_STREAM])
        instance_ids = {e.data["instance_id"] for e in events if e.type == "InstancePlaced"}
        events += _streams(conn, [f"instance-{i}" for i in sorted(instance_ids)])
        with conn.cursor() as cur:
            cur.execute(f"{_SELECT} WHERE e.stream LIKE 'host-%'")
            host_events = [recorded(r) for r in cur.fetchall()]
            events += host_events
            for host_id in sorted({e.data["host_id"] for e in host_events}):
                cur.execute(f"{_SELECT} WHERE e.stream = %s ORDER BY e.version DESC LIMIT 1",
                            (f"heartbeat-{host_id}",))
                events += [recorded(r) for r in cur.fetchall()]
            head = head_of(cur)
    conn.close()
    explanation = explain(app, events, now)
    return Explanation(explanation.app, explanation.serving, head, explanation.findings)


def _streams(conn: Any, streams: Iterable[str]) -> list[RecordedEvent]:
    with conn.cursor() as cur:
        cur.execute(f"{_SELECT} WHERE e.stream = ANY(%s) ORDER BY p.position", (list(streams),))
        return [recorded(r) for r in cur.fetchall()]
