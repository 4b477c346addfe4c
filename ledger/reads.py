"""Every read of the ledger's tables, as functions over a cursor: `Ledger` calls them with
its own connection (and retries), and a reader that needs one consistent snapshot over
several reads (`tally why`, lag) calls them with its own REPEATABLE READ cursor. Nothing
outside `ledger/` writes SQL against `ledger.events` or `ledger.positions`.

Readers see sequenced events only (`position` set by `Ledger.sequence`): a position is
final, dense apart from holes retention leaves, and the same for every reader.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent
from ledger.payloads import upcast

COLUMNS = "p.position, e.id, e.stream, e.version, e.type, e.data, e.metadata, e.recorded_at"
"""What `recorded` turns into an event, from events e joined with positions p."""
_FROM = "FROM ledger.positions p JOIN ledger.events e ON e.id = p.event_id"


@dataclass(frozen=True)
class Range:
    """Which sequenced events to read: after < position <= upto, filtered; at most
    `limit`, the oldest of them (or, with `newest`, the newest), always in ledger order."""

    after: int = 0
    upto: int | None = None
    streams: Iterable[str] | None = None
    categories: Iterable[str] | None = None
    types: Iterable[str] | None = None
    since: datetime | None = None
    """Recorded at or after."""
    limit: int | None = 1000
    newest: bool = False

    def __post_init__(self) -> None:
        if self.after < 0:
            raise ValueError(f"position must be >= 0, not {self.after}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, not {self.limit}")


def read(cur: Any, r: Range) -> list[RecordedEvent]:
    """The events of `r`, in ledger order."""
    where = ["p.position > %(after)s"]
    params: dict[str, Any] = {"after": r.after, "limit": r.limit}
    for column, key, values in (("e.stream", "streams", r.streams),
                                ("e.category", "cats", r.categories),
                                ("e.type", "types", r.types)):
        if values is not None:
            where.append(f"{column} = ANY(%({key})s)")
            params[key] = list(values)
    if r.upto is not None:
        where.append("p.position <= %(upto)s")
        params["upto"] = r.upto
    if r.since is not None:
        where.append("e.recorded_at >= %(since)s")
        params["since"] = r.since
    order = "DESC" if r.newest else "ASC"
    cur.execute(f"SELECT {COLUMNS} {_FROM} WHERE {' AND '.join(where)} "
                f"ORDER BY p.position {order} LIMIT %(limit)s", params)
    events = [recorded(row) for row in cur.fetchall()]
    return events[::-1] if r.newest else events


# A batch is a closed range of positions, not a LIMIT: no sort of what lies beyond,
# whatever plan the statistics lead to. Ranges may hold fewer events than positions:
# retention (ledger/retention.py) leaves holes where it pruned old heartbeats.
_BATCH = f"""SELECT p.position, e.id, e.stream, e.version, e.type, e.data,
    coalesce((e.metadata->>'schema')::int, 1), e.recorded_at
    {_FROM} WHERE p.position > %s AND p.position <= %s ORDER BY p.position"""


def read_batch(cur: Any, after: int, upto: int) -> list[RecordedEvent]:
    """Every event with after < position <= upto, metadata left undecoded (the events'
    `metadata` holds only the schema version): the projectors' hot path."""
    cur.execute(_BATCH, (after, upto))
    return [RecordedEvent(pos, id_, stream, version, type_,
                          upcast(type_, data, schema) if schema != 1 else data,
                          {"schema": schema}, at)
            for pos, id_, stream, version, type_, data, schema, at in cur.fetchall()]


def last_of(cur: Any, stream: str) -> RecordedEvent | None:
    """A stream's newest sequenced event (e.g. a host's last heartbeat)."""
    cur.execute(f"SELECT {COLUMNS} {_FROM} WHERE e.stream = %s ORDER BY e.version DESC "
                "LIMIT 1", (stream,))
    row = cur.fetchone()
    return None if row is None else recorded(row)


def of_streams(cur: Any, streams: list[str], types: list[str]) -> list[RecordedEvent]:
    """Every event of these types in these streams, sequenced or not (an unsequenced one has
    no position): what was committed a moment ago counts, as for read_stream. In stream and
    version order."""
    cur.execute(f"SELECT {COLUMNS} FROM ledger.events e LEFT JOIN ledger.positions p "
                "ON p.event_id = e.id WHERE e.stream = ANY(%s) AND e.type = ANY(%s) "
                "ORDER BY e.stream, e.version", (streams, types))
    return [recorded(row) for row in cur.fetchall()]


def last_per_stream(cur: Any, category: str, after: int,
                    upto: int) -> list[tuple[int, str, datetime]]:
    """(position, stream, recorded_at) of the newest event of each stream of `category`
    with after < position <= upto, in ledger order; no payload is read or decoded. A fold
    that needs only when each stream was last heard of (the placer's liveness from
    heartbeats) reads this instead of every event."""
    cur.execute("SELECT position, stream, recorded_at FROM (SELECT DISTINCT ON (e.stream) "
                f"p.position, e.stream, e.recorded_at {_FROM} WHERE p.position > %s "
                "AND p.position <= %s AND e.category = %s "
                "ORDER BY e.stream, p.position DESC) last ORDER BY position",
                (after, upto, category))
    return [(pos, stream, at) for pos, stream, at in cur.fetchall()]


def desired_moves(cur: Any, after: int, upto: int,
                  types: list[str]) -> list[tuple[str | None, str | None, int]]:
    """(host_id, app, the last position) of the events of `types` with after < position
    <= upto, per distinct (host_id, app): whose desired state they moved (the relays'
    per-host wake-ups). Payloads are read for those two fields only."""
    cur.execute("SELECT e.data->>'host_id', e.data->>'app', max(p.position) "
                f"{_FROM} WHERE p.position > %s AND p.position <= %s AND e.type = ANY(%s) "
                "GROUP BY 1, 2", (after, upto, types))
    return [(host, app, at) for host, app, at in cur.fetchall()]


def recorded_after(cur: Any, position: int) -> datetime | None:
    """When the first event after `position` was recorded (how long a reader at
    `position` has kept it waiting); None when nothing follows."""
    cur.execute(f"SELECT e.recorded_at {_FROM} WHERE p.position > %s ORDER BY p.position "
                "LIMIT 1", (position,))
    row = cur.fetchone()
    return None if row is None else row[0]


def head_of(cur: Any) -> int:
    """The highest position readers can see: everything at or below it is final."""
    cur.execute("SELECT coalesce(max(position), 0) FROM ledger.positions")
    head: int = cur.fetchone()[0]
    return head


def recorded(row: tuple[Any, ...]) -> RecordedEvent:
    """A row of COLUMNS as an event, its payload upcast to the current schema."""
    position, id_, stream, version, type_, data, metadata, recorded_at = row
    stored = metadata.get("schema", 1) if isinstance(metadata, dict) else 1
    return RecordedEvent(position, id_, stream, version, type_, upcast(type_, data, stored),
                         metadata, recorded_at)
