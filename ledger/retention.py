"""Retention for high-volume observed state (heartbeats): an explicit, stated policy.

Desired state and history of decisions are kept forever. Heartbeats are not: a host that
beats every few seconds writes a million events a month, and only the recent ones (and the
last one of each host) explain anything. `prune` deletes events of the named categories
recorded before `now - max_age`, always keeping the newest event of each stream, in short
batches so no long writing transaction holds ledger readers back.

Positions are never reused: a pruned event leaves a hole that readers step over, and
`state --at N` for an old N shows fewer heartbeats than there were. The sequencer's cursor
(the highest position row) is never deleted.

`tally serve retention` applies the policy on its own schedule (every few minutes, short
batches) and records each run as a RetentionApplied event; `tally ledger status` shows the
ledger's size and what retention removed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2

from ledger.events import NewEvent
from ledger.store import Ledger

DEFAULT_POLICIES = ("heartbeat",)

_PRUNE = """
WITH doomed AS (
    SELECT e.id FROM ledger.events e
    WHERE e.category = %(category)s AND e.recorded_at < %(cutoff)s
      AND (%(stream)s::text IS NULL OR e.stream = %(stream)s)
      AND e.version < (SELECT max(m.version) FROM ledger.events m WHERE m.stream = e.stream)
    LIMIT %(batch)s
), gone AS (
    DELETE FROM ledger.events e USING doomed WHERE e.id = doomed.id RETURNING e.id
), unplaced AS (
    DELETE FROM ledger.positions p USING gone
    WHERE p.event_id = gone.id
      AND p.position < (SELECT max(position) FROM ledger.positions)
)
SELECT count(*) FROM gone
"""


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep events of `category` for `max_age` (and each stream's newest forever)."""

    category: str
    max_age: timedelta

    def __post_init__(self) -> None:
        if self.category not in DEFAULT_POLICIES:
            raise ValueError(f"only {', '.join(DEFAULT_POLICIES)} events may be pruned; "
                             f"{self.category} is history tally keeps")

    def cutoff(self, now: datetime) -> datetime:
        return now - self.max_age


def prune(owner_dsn: str, policy: RetentionPolicy, now: datetime | None = None,
          batch: int = 5000, stream: str | None = None) -> int:
    """Apply the policy (to one stream only, if named); returns how many events were
    deleted. Needs the owner role."""
    now = now or datetime.now(UTC)
    params = {"category": policy.category, "cutoff": policy.cutoff(now), "batch": batch,
              "stream": stream}
    total = 0
    conn = psycopg2.connect(owner_dsn, application_name="tally-retention")
    try:
        conn.autocommit = True  # one short transaction per batch
        with conn.cursor() as cur:
            while True:
                cur.execute(_PRUNE, params)
                deleted = (cur.fetchone() or (0,))[0]
                total += deleted
                if deleted < batch:
                    return total
    finally:
        conn.close()


def apply(owner_dsn: str, ledger: Ledger, policy: RetentionPolicy,
          now: datetime | None = None) -> int:
    """Prune by the policy and record what was removed (RetentionApplied in
    `retention-<category>`), so the ledger says what it forgot; returns the count."""
    now = now or datetime.now(UTC)
    deleted = prune(owner_dsn, policy, now)
    ledger.append(f"retention-{policy.category}", [NewEvent("RetentionApplied", {
        "category": policy.category, "deleted": deleted,
        "older_than_s": policy.max_age.total_seconds(),
        "cutoff": policy.cutoff(now).isoformat()})])
    return deleted


def status(ledger: Ledger, categories: tuple[str, ...] = DEFAULT_POLICIES) -> dict[str, Any]:
    """The ledger's size on disk and rows, and per pruned category what retention removed
    (in all, and at its last run)."""
    with ledger.connection().cursor() as cur:
        cur.execute("SELECT pg_total_relation_size('ledger.events'), "
                    "pg_total_relation_size('ledger.positions'), "
                    "(SELECT reltuples::bigint FROM pg_class "
                    " WHERE oid = 'ledger.events'::regclass)")
        events_bytes, positions_bytes, rows = cur.fetchone()
    removed = {}
    for category in categories:
        runs = ledger.read_stream(f"retention-{category}")
        last = runs[-1] if runs else None
        removed[category] = {
            "runs": len(runs), "deleted_total": sum(r.data["deleted"] for r in runs),
            "last_run_at": last.recorded_at.isoformat() if last else None,
            "last_deleted": last.data["deleted"] if last else None,
            "older_than_s": last.data["older_than_s"] if last else None}
    return {"bytes": events_bytes + positions_bytes, "events_estimate": max(rows, 0),
            "retention": removed}
