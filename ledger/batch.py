"""One transaction for events of many streams: what turns thousands of heartbeats a second
into a few appends.

`Ledger.append` writes one stream per transaction, each committed on the primary and the
synchronous standby: at 2,000 heartbeats/s that is 2,000 commits/s, which this ledger
does not reach (bench/ledger.py: ~4,000/s with 16 writers and nothing else running). The
API instead gathers the heartbeats of a short interval and appends them here, one row per
event in one INSERT, each at the next version of its own stream (ANY: no expected
version), each with its own idempotency key, so a retry after a lost connection writes
nothing twice. The statement is all or nothing: a concurrent append to one of the streams
(a version taken meanwhile) makes it try again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors

from ledger.catalogue import stream_category
from ledger.errors import InvalidEvent, LedgerUnavailable
from ledger.events import MAX_BATCH, AppendResult, NewEvent
from ledger.store import Ledger, _encoded

_INSERT = """
INSERT INTO ledger.events (stream, category, version, type, data, metadata, idempotency_key)
SELECT t.stream, t.category,
       coalesce(cur.v, 0) + row_number() OVER (PARTITION BY t.stream ORDER BY t.n),
       t.type, t.data::jsonb, t.metadata::jsonb, t.key
FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])
     WITH ORDINALITY AS t(stream, category, type, data, metadata, key, n)
LEFT JOIN LATERAL (SELECT max(e.version) AS v FROM ledger.events e
                   WHERE e.stream = t.stream) cur ON true
WHERE NOT EXISTS (SELECT 1 FROM ledger.events d WHERE d.idempotency_key = t.key)
  AND NOT EXISTS (SELECT 1 FROM ledger.events d WHERE d.idempotency_key = %s)
ORDER BY t.n
RETURNING id
"""
ATTEMPTS = 50

_INSERT_AT = """
INSERT INTO ledger.events (stream, category, version, type, data, metadata, idempotency_key)
SELECT t.stream, t.category, t.version, t.type, t.data::jsonb, t.metadata::jsonb, t.key
FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[])
     WITH ORDINALITY AS t(stream, category, version, type, data, metadata, key, n)
ORDER BY t.n
RETURNING id
"""


@dataclass(frozen=True)
class Item:
    """One event for one stream, with the key that makes sending it again harmless."""

    stream: str
    event: NewEvent
    key: str | None = None


def append_streams(ledger: Ledger, items: Sequence[Item], batch_key: str | None = None) -> int:
    """Append every item in one transaction; returns how many rows were new (an item whose
    key is already in the ledger was written before and is skipped). With `batch_key`, the
    batch is the unit instead: its first event carries that key, and a batch whose key is
    in the ledger writes nothing (the transaction wrote all of it or none), so a batch sent
    again after a lost answer is not doubled while its other events carry no key of their
    own (no index entry, no lookup each). Raises InvalidEvent before writing anything if one
    item is invalid."""
    if not items:
        return 0
    columns: list[Any] = [[], [], [], [], [], []]
    for n, it in enumerate(items):
        category = stream_category(it.stream)
        type_, data, meta = _encoded(category, it.event)
        key = (batch_key if n == 0 else None) if batch_key else it.key
        for col, value in zip(columns, (it.stream, category, type_, data, meta, key),
                              strict=True):
            col.append(value)
    columns.append(batch_key)

    def run(cur: Any) -> int:
        for _ in range(ATTEMPTS):
            try:
                cur.execute(_INSERT, columns)
                return len(cur.fetchall())
            except psycopg2.errors.UniqueViolation:
                continue  # a version or key taken by a concurrent append: again, afresh
        raise LedgerUnavailable(f"{len(items)} events too contended to append together")

    written = ledger._retrying(run)
    if written:  # the relays' wake-up, at most once per NOTIFY_EVERY_S as for append
        ledger._woken(AppendResult(items[0].stream, (), (), False, ()))
    return written


@dataclass(frozen=True)
class Checked:
    """Events for one stream, to follow exactly version `expected` (0: a new stream)."""

    stream: str
    expected: int
    events: Sequence[NewEvent]


def append_checked(ledger: Ledger, appends: Sequence[Checked]) -> list[int]:
    """Append every one in one transaction, each at the versions after its `expected`, or
    none; the new events' ids. None ([]) when a stream has moved past what its caller read
    (the (stream, version) key refuses the row), and the caller then appends them one by
    one to learn which. One
    commit for what would be as many as there are streams: the placer's round after a scale
    change of 1,000 instances over 100 apps, or the loss of 100 hosts at once."""
    if not appends:
        return []
    columns: list[list[Any]] = [[], [], [], [], [], [], []]
    for a in appends:
        category = stream_category(a.stream)
        if not a.events or len(a.events) > MAX_BATCH or a.expected < 0:
            raise InvalidEvent(f"an append to {a.stream} of {len(a.events)} events at "
                               f"{a.expected}: 1 to {MAX_BATCH} events, at a version >= 0",
                               {"_events": ["empty, too many or at a negative version"]})
        for i, ev in enumerate(a.events, 1):
            type_, data, meta = _encoded(category, ev)
            key = ledger.new_key() if i == 1 else None
            for col, value in zip(columns, (a.stream, category, a.expected + i, type_, data,
                                            meta, key), strict=True):
                col.append(value)

    def run(cur: Any) -> list[int]:
        try:
            cur.execute(_INSERT_AT, columns)
        except psycopg2.errors.UniqueViolation:
            return []
        return [row[0] for row in cur.fetchall()]

    done = ledger._retrying(run)
    if done:
        key = next(k for k in columns[6] if k)
        if ledger.connection().notices:  # perhaps the wait for the standby was cut short
            ledger._confirm_if_cut(key)
        ledger._woken(AppendResult(appends[0].stream, (), (), False, ()))
    return done
