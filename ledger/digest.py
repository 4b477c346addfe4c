"""What a copy of the ledger holds up to a position, as two figures that can be compared:
the number of events and a sha256 over them in ledger order.

A backup is good only if a copy restored from it holds exactly the live ledger's events up
to the copy's own head (agents/backups/verify.py). Categories under a retention policy
(heartbeats, ledger/retention.py) are left out of both figures: the live ledger deletes
old ones after the backup was taken, and the copy rightly still has them.

`cut_after` makes a restored copy end at a position (a point-in-time restore to a
position rather than a time): events placed after it, and events not placed yet, go.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ledger.retention import DEFAULT_POLICIES

_HEAD = "SELECT coalesce(max(position), 0) FROM ledger.positions"
_EVENTS = """
SELECT p.position, e.id, e.stream, e.version, e.type, e.data::text
FROM ledger.positions p JOIN ledger.events e ON e.id = p.event_id
WHERE p.position <= %s AND e.category <> ALL(%s)
ORDER BY p.position
"""


@dataclass(frozen=True)
class Digest:
    """The events up to `position` (retention's categories left out): how many, and their
    sha256 in ledger order."""

    position: int
    events: int
    sha256: str


def head(conn: Any) -> int:
    """The highest position placed in this copy of the ledger (0 if none)."""
    with conn.cursor() as cur:
        cur.execute(_HEAD)
        return int(cur.fetchone()[0])


def digest(conn: Any, upto: int | None = None,
           skip: tuple[str, ...] = DEFAULT_POLICIES) -> Digest:
    """Count and hash the events at positions <= `upto` (default: this copy's head).
    Streams through a server-side cursor: a ledger of any size in constant memory."""
    position = head(conn) if upto is None else upto
    sha, count = hashlib.sha256(), 0
    with conn.cursor(name="tally_digest") as cur:
        cur.itersize = 5000
        cur.execute(_EVENTS, (position, list(skip)))
        for pos, event_id, stream, version, type_, data in cur:
            sha.update(f"{pos}\x1f{event_id}\x1f{stream}\x1f{version}\x1f{type_}\x1f"
                       f"{data}\x1e".encode())
            count += 1
    conn.rollback()  # end the read's transaction: no snapshot held afterwards
    return Digest(position, count, sha.hexdigest())


def cut_after(conn: Any, position: int) -> int:
    """Delete every event placed after `position` and every event not placed yet, in one
    transaction; returns how many went. For a restored copy only, never the live ledger."""
    with conn.cursor() as cur:
        cur.execute("DELETE FROM ledger.positions WHERE position > %s", (position,))
        cur.execute("DELETE FROM ledger.events e WHERE NOT EXISTS "
                    "(SELECT 1 FROM ledger.positions p WHERE p.event_id = e.id)")
        gone = cur.rowcount
    conn.commit()
    return gone
