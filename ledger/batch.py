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
from ledger.errors import LedgerUnavailable
from ledger.events import AppendResult, NewEvent
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
ORDER BY t.n
RETURNING id
"""
ATTEMPTS = 50


@dataclass(frozen=True)
class Item:
    """One event for one stream, with the key that makes sending it again harmless."""

    stream: str
    event: NewEvent
    key: str


def append_streams(ledger: Ledger, items: Sequence[Item]) -> int:
    """Append every item in one transaction; returns how many rows were new (an item whose
    key is already in the ledger was written before and is skipped). Raises InvalidEvent
    before writing anything if one item is invalid."""
    if not items:
        return 0
    columns: list[list[str]] = [[], [], [], [], [], []]
    for it in items:
        category = stream_category(it.stream)
        type_, data, meta = _encoded(category, it.event)
        for col, value in zip(columns, (it.stream, category, type_, data, meta, it.key),
                              strict=True):
            col.append(value)

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
