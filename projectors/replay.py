"""Replay for debugging: the same projector code, into temporary tables, up to a position.

`state_at` answers "what did the view say at position N"; `diff` compares two positions
in one pass. Temporary tables live and die with the connection, so an interrupted replay
leaves nothing behind, and nothing it writes is WAL-logged or replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ledger import Ledger
from projectors import ALL, Projector, owner_of
from projectors.runtime import BATCH, FLUSH_EVERY, Runner, catch_up, connect
from projectors.store import copy_tables, read_rows
from projectors.tables import Row


class BadPosition(ValueError):
    """A position outside 0..head."""


class ReplayFailed(RuntimeError):
    """A handler failed on an event on the way to the position asked for."""


def check_position(position: int, head: int) -> None:
    if position < 0:
        raise BadPosition(f"position must be >= 0, not {position}")
    if position > head:
        raise BadPosition(f"position {position} is beyond the ledger head ({head})")


def views_for(view: str | None) -> tuple[list[str], list[Projector]]:
    """The views to show and the projectors needed (raises UnknownProjector)."""
    if view is not None:
        return [view], [owner_of(view)]
    return [t for p in ALL for t in p.public], list(ALL)


def replay(dsn: str, positions: Sequence[int], view: str | None = None,
           batch: int = BATCH) -> list[dict[str, list[Row]]]:
    """Project from zero, taking a snapshot of the views at each of `positions`
    (ascending)."""
    names, projectors = views_for(view)
    with Ledger(dsn, notify=False, application_name="tally-replay") as ledger:
        head = ledger.head()
        for p in positions:
            check_position(p, head)
        conn = connect(dsn, "pg_temp", "tally-replay")
        try:
            with conn, conn.cursor() as cur:  # tally_reader is read-only but for temp tables
                cur.execute("SET default_transaction_read_only = off")
            with conn, conn.cursor() as cur:
                for projector in projectors:
                    copy_tables(cur, projector, "pg_temp", temporary=True)
            runners = [Runner(p, conn, checkpointed=False, flush_every=FLUSH_EVERY)
                       for p in projectors]
            shots = []
            for position in sorted(positions):
                catch_up(runners, ledger, position, batch)
                for runner in runners:
                    if runner.stopped is not None:
                        raise ReplayFailed(str(runner.stopped))
                    runner.flush()
                with conn, conn.cursor() as cur:
                    shots.append({v: read_rows(cur, v, owner_of(v).tables[v]) for v in names})
            return shots
        finally:
            conn.close()


def state_at(dsn: str, position: int, view: str | None = None) -> dict[str, list[Row]]:
    return replay(dsn, [position], view)[0]


def diff_rows(before: list[Row], after: list[Row], key: tuple[str, ...]) -> dict[str, list]:
    """added / removed rows and changed ones as {key, changes: {column: [old, new]}}."""
    old = {tuple(r[c] for c in key): r for r in before}
    new = {tuple(r[c] for c in key): r for r in after}
    changed = []
    for k in sorted(old.keys() & new.keys(), key=str):
        delta = {c: [old[k].get(c), v] for c, v in new[k].items() if old[k].get(c) != v}
        if delta:
            changed.append({"key": list(k), "changes": delta})
    return {
        "added": [new[k] for k in sorted(new.keys() - old.keys(), key=str)],
        "removed": [old[k] for k in sorted(old.keys() - new.keys(), key=str)],
        "changed": changed,
    }


def diff(dsn: str, a: int, b: int, view: str | None = None) -> dict[str, dict[str, list]]:
    """What changed in each view between positions a and b (a <= b, else swapped)."""
    a, b = sorted((a, b))
    before, after = replay(dsn, [a, b], view)
    return {v: diff_rows(before[v], after[v], owner_of(v).tables[v]) for v in before}


def jsonable(value: Any) -> Any:
    """Rows as JSON: times as ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
