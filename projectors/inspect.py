"""Read-side shells for the CLI (and later the HTTP API): list ledger events with filters,
the projectors' status and lag, and the events `why` reasons over. Each takes a DSN and
returns plain values."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import psycopg2

from ledger import reads
from ledger.catalogue import CATALOGUE, stream_category
from ledger.events import RecordedEvent
from ledger.payloads import event_type
from ledger.vocabulary import LIVENESS_STREAM
from projectors import ALL
from projectors.why import Explanation, explain


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
    def one(value: str | None) -> list[str] | None:
        return None if value is None else [value]

    r = reads.Range(after or 0, None, one(stream), one(category), one(type_), since, limit,
                    newest=after is None)
    with conn.cursor() as cur:
        return reads.read(cur, r)


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
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        cur.execute("SELECT name, position, state, lag_seconds, updated_at, error_position, "
                    "error_type, error_message, clock_timestamp() "
                    "FROM views.projector_checkpoints")
        rows = {r[0]: r for r in cur.fetchall()}
        head = reads.head_of(cur)
        waiting = {p: reads.recorded_after(cur, p) for p in {r[1] for r in rows.values()}}
    conn.close()
    out = []
    for p in ALL:
        r = rows.get(p.name)
        if r is None:
            out.append({"name": p.name, "position": 0, "state": "never run", "head": head,
                        "lag_events": head, "lag_seconds": None, "recorded_lag_seconds": None,
                        "updated_at": None, "error": None})
            continue
        name, position, state, recorded_lag, updated, err_pos, err_type, err_msg, now = r
        oldest = waiting[position]
        error = None if err_pos is None else {"position": err_pos, "type": err_type,
                                              "message": err_msg}
        out.append({"name": name, "position": position, "state": state, "head": head,
                    "lag_events": max(head - position, 0),
                    "lag_seconds": (now - oldest).total_seconds() if oldest else 0.0,
                    "recorded_lag_seconds": recorded_lag, "updated_at": updated,
                    "error": error})
    return out


def why(dsn: str, app: str, now: datetime) -> Explanation:
    """Load what `why` needs (the app, its placements and instances, the hosts and their
    last heartbeats) and explain. One read-only snapshot: the answer's head is the head of
    what it read, and no event read later contradicts one read earlier."""
    with psycopg2.connect(dsn, application_name="tally-why") as conn:
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        with conn.cursor() as cur:
            events = _streams(cur, [f"app-{app}", f"placement-{app}", LIVENESS_STREAM])
            instance_ids = {e.data["instance_id"] for e in events
                            if e.type == "InstancePlaced"}
            events += _streams(cur, [f"instance-{i}" for i in sorted(instance_ids)])
            host_events = reads.read(cur, reads.Range(categories=["host"], limit=None))
            events += host_events
            for host_id in sorted({e.data["host_id"] for e in host_events}):
                beat = reads.last_of(cur, f"heartbeat-{host_id}")
                events += [beat] if beat else []
            head = reads.head_of(cur)
    conn.close()
    explanation = explain(app, events, now)
    return Explanation(explanation.app, explanation.serving, head, explanation.findings)


def _streams(cur: Any, streams: Iterable[str]) -> list[RecordedEvent]:
    return reads.read(cur, reads.Range(streams=list(streams), limit=None))
