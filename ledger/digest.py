"""What a copy of the ledger holds up to a position, as two figures that can be compared:
the number of events and a sha256 over them in ledger order (over the sha256 of each part
of PART positions, as PostgreSQL's COPY renders its events).

A backup is good only if a copy restored from it holds exactly the live ledger's events up
to the copy's own head (agents/backups/verify.py). Categories under a retention policy
(heartbeats, ledger/retention.py) are left out of both figures: the live ledger deletes
old ones after the backup was taken, and the copy rightly still has them.

`cut_after` makes a restored copy end at a position (a point-in-time restore to a
position rather than a time): events placed after it, and events not placed yet, go.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ledger.retention import DEFAULT_POLICIES

_HEAD = "SELECT coalesce(max(position), 0) FROM ledger.positions"
_PART = """
COPY (SELECT p.position, e.id, e.stream, e.version, e.type, e.data
      FROM ledger.positions p JOIN ledger.events e ON e.id = p.event_id
      WHERE p.position > %s AND p.position <= %s AND e.category <> ALL(%s)
      ORDER BY p.position) TO STDOUT
"""
PART = 50_000
"""Positions per part at most (and at least two parts of equal size: the bounds depend on
the position alone): each part's events are hashed on their own, and the digest is the
sha256 of the parts' sha256s in order, so parts can be read side by side."""
SORT_MEMORY = "64MB"
"""work_mem for a part's read: its rows are sorted in memory, not on disk."""


@dataclass(frozen=True)
class Digest:
    """The events up to `position` (retention's categories left out): how many, and their
    digest (ledger order)."""

    position: int
    events: int
    sha256: str


def head(conn: Any) -> int:
    """The highest position placed in this copy of the ledger (0 if none)."""
    with conn.cursor() as cur:
        cur.execute(_HEAD)
        return int(cur.fetchone()[0])


class _Part:
    """A COPY's output, hashed as it arrives; its rows are its newlines (COPY's text
    format escapes a newline inside a value)."""

    def __init__(self) -> None:
        self.sha, self.rows = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.rows += chunk.count(b"\n")


def _part(conn: Any, low: int, high: int, skip: tuple[str, ...]) -> tuple[int, bytes]:
    """(events, sha256) of the positions in (low, high], as PostgreSQL's COPY writes
    them (position, id, stream, version, type, payload; tab-separated, a line each)."""
    out = _Part()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SET LOCAL work_mem = '{SORT_MEMORY}'")
            cur.copy_expert(cur.mogrify(_PART, (low, high, list(skip))).decode(), out,
                            size=1 << 20)
    finally:
        conn.rollback()  # end the read's transaction: no snapshot held afterwards
    return out.rows, out.sha.digest()


def digest(conn: Any, upto: int | None = None, skip: tuple[str, ...] = DEFAULT_POLICIES,
           connect: Callable[[], Any] | None = None, workers: int = 2) -> Digest:
    """Count and hash the events at positions <= `upto` (default: this copy's head), in
    parts of at most PART positions (constant memory whatever the ledger's size). With `connect`
    (a new connection to the same server), `workers` parts are read at once: PostgreSQL
    does the work (joining, rendering the payloads), each part in a server process of its
    own. The positions up to a placed head never change, so parts read in different
    transactions still describe one ledger."""
    position = head(conn) if upto is None else upto
    parts_of = max(2, -(-position // PART))
    size = max(1, -(-position // parts_of))
    bounds = [(low, min(low + size, position)) for low in range(0, position, size)]
    if connect is None or len(bounds) < 2:
        parts = [_part(conn, low, high, skip) for low, high in bounds]
    else:
        local = threading.local()
        opened: list[Any] = []
        lock = threading.Lock()

        def read(bound: tuple[int, int]) -> tuple[int, bytes]:
            if not hasattr(local, "conn"):
                local.conn = connect()
                with lock:
                    opened.append(local.conn)
            return _part(local.conn, *bound, skip)

        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="digest") as pool:
                parts = list(pool.map(read, bounds))
        finally:
            for c in opened:
                c.close()
    total = hashlib.sha256(b"".join(sha for _rows, sha in parts))
    return Digest(position, sum(rows for rows, _sha in parts), total.hexdigest())


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
