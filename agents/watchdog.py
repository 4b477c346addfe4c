"""The ledger watchdog: no session may hold a transaction id for long.

Ledger readers see events only below the oldest transaction id still running in the whole
cluster (ledger/store.py), so any session holding one holds every reader back: a writer's
back-to-back statements (no statement or idle timeout fires), a reader in another database
that called pg_current_xact_id() and slept. Timeouts per role cannot see those; this can.
Every `interval` it lists the primary's client sessions that hold an xid, ends those that
have held it past `limit` seconds, and records each as LedgerSessionTerminated. (Roles that
never write cannot take one: ledger/cluster.py makes tally_reader read-only and keeps the
xid functions to the writing roles; replay's temporary tables are its only writes.) Query
texts are kept with their literals blanked, so a password in an ALTER ROLE never reaches
the ledger.

A COMMIT waiting for the synchronous standby also holds its xid, but is left alone: ending
it frees no reader (the sequencer places nothing the standby lacks) and only turns the
append into an "outcome unknown". Records are appended from a thread of their own, so a
record waiting for an absent standby never stops the watchdog from looking.

It also records each change of leader (a failover or a switchover by Patroni) as
LedgerLeaderChanged, once per timeline (the timeline is its idempotency key), when the new
leader has acknowledged the append: so only once it accepts writes.

`overdue` decides over plain values; `Watchdog` only moves rows.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg2

from ledger import Ledger, LedgerUnavailable, NewEvent

log = logging.getLogger("tally.watchdog")

STREAM = "ledger-watchdog"
LEADERS = "ledger-leaders"
MAX_QUERY = 500

_LEADER = """SELECT inet_server_port(),
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"""
_SESSIONS = """
SELECT pid, usename, datname, application_name,
       extract(epoch FROM clock_timestamp() - xact_start)::float, query,
       wait_event IS NOT DISTINCT FROM 'SyncRep'
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND backend_xid IS NOT NULL
  AND pid <> pg_backend_pid()
"""


@dataclass(frozen=True)
class Session:
    """A client session holding a transaction id, as pg_stat_activity shows it."""

    pid: int
    role: str
    database: str
    application: str
    held_s: float
    query: str
    waiting_for_standby: bool = False


def overdue(sessions: list[Session], limit: float) -> list[Session]:
    """The sessions to end: holding an xid past `limit` s, unless waiting for the standby."""
    return [s for s in sessions if s.held_s > limit and not s.waiting_for_standby]


def blanked(query: str) -> str:
    """The query with its string literals blanked, cut to MAX_QUERY characters."""
    return re.sub(r"'(?:[^']|'')*'", "'?'", query)[:MAX_QUERY]


def terminated_event(s: Session, limit: float) -> NewEvent:
    return NewEvent("LedgerSessionTerminated", {
        "role": s.role, "database": s.database, "application": s.application[:200],
        "pid": s.pid, "duration_s": round(s.held_s, 3), "limit_s": limit,
        "query": blanked(s.query)}, {"actor": "watchdog"})


class Watchdog:
    """Looks at the primary every `interval` s through a superuser DSN (only a superuser may
    end a superuser's session), records through the writer's."""

    def __init__(self, admin_dsn: str, writer_dsn: str, limit: float,
                 interval: float | None = None, nodes: dict[int, str] | None = None) -> None:
        self.admin_dsn = admin_dsn
        self.nodes = nodes or {}
        """Node name by port, to name the leader."""
        self.timeline: int | None = None
        self.leader: str | None = None
        """The last timeline recorded (or queued) as LedgerLeaderChanged."""
        self.limit = limit
        self.interval = interval if interval is not None else min(1.0, max(0.1, limit / 4))
        self.ledger = Ledger(writer_dsn, retry_deadline=10, application_name="tally-watchdog")
        self.stop = threading.Event()
        self._conn: Any = None
        self._records: queue.SimpleQueue[tuple[str, list[NewEvent], str | None] | None] = \
            queue.SimpleQueue()

    def sessions(self) -> list[Session]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg2.connect(self.admin_dsn, application_name="tally-watchdog")
            self._conn.autocommit = True
        with self._conn.cursor() as cur:
            cur.execute(_SESSIONS)
            return [Session(pid, role or "", db or "", app or "", held or 0.0, query or "", sync)
                    for pid, role, db, app, held, query, sync in cur.fetchall()]

    def step(self) -> list[Session]:
        """End and record every overdue session; returns them."""
        ended = []
        for s in overdue(self.sessions(), self.limit):
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (s.pid,))
                if not cur.fetchone()[0]:
                    continue  # gone by itself meanwhile
            log.warning("ended session %s of %s in %s: held a transaction id %.1fs: %s",
                        s.pid, s.role, s.database, s.held_s, blanked(s.query)[:100])
            ended.append(s)
        if ended:
            self._records.put((STREAM, [terminated_event(s, self.limit) for s in ended], None))
        return ended

    def watch_leader(self) -> None:
        """Queue LedgerLeaderChanged if the primary's timeline is not the last recorded."""
        with self._conn.cursor() as cur:
            cur.execute(_LEADER)
            port, timeline = cur.fetchone()
        if self.timeline is None:
            last = self.ledger.read_stream(LEADERS)
            self.timeline = last[-1].data["timeline"] if last else 0
            self.leader = last[-1].data["leader"] if last else None
        if timeline != self.timeline:
            leader = self.nodes.get(port, str(port))
            self._records.put((LEADERS, [NewEvent("LedgerLeaderChanged", {
                "leader": leader, "previous": self.leader, "timeline": timeline},
                {"actor": "watchdog"})], f"ledger-leader-timeline-{timeline}"))
            log.info("leader is now %s (timeline %d)", leader, timeline)
            self.timeline, self.leader = timeline, leader

    def _record(self) -> None:
        while (item := self._records.get()) is not None:
            stream, events, key = item
            try:
                self.ledger.append(stream, events, idempotency_key=key)
            except LedgerUnavailable as exc:  # OutcomeUnknown too: the record may be lost
                log.warning("could not record %s: %s", events[0].type, exc)
                if key is not None:
                    self.timeline = None  # read the stream again and retry
                    time.sleep(1)

    def run(self) -> None:
        recorder = threading.Thread(target=self._record, name="watchdog-recorder", daemon=True)
        recorder.start()
        while not self.stop.is_set():
            try:
                self.step()
                self.watch_leader()
            except (psycopg2.Error, LedgerUnavailable) as exc:
                log.warning("ledger unreachable, retrying: %s", str(exc).strip())
                if self._conn is not None:
                    self._conn.close()
            self.stop.wait(self.interval)
        self._records.put(None)
        recorder.join(10)
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.ledger.close()
