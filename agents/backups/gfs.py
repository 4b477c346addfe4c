"""Grandfather-father-son retention as a pure rule: which backups of one target to keep.

Keep the newest verified backup of each of the last `hourly` hours that have one, of the
last `daily` days, `weekly` ISO weeks and `monthly` months (the sets overlap: a backup kept
as an hour's may also be its day's); the newest verified backup is always kept. Only
verified backups count and only verified backups are ever pruned: an unverified one is
either being checked or will be recorded failed, and a failed one was never good. So no
backup is pruned before a newer one has been verified: whatever is pruned is older than
the newest verified backup, which stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

Bucket = Callable[[datetime], tuple[int, ...]]

BUCKETS: dict[str, Bucket] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
}


@dataclass(frozen=True)
class Policy:
    """How many of each to keep (0: none of that kind)."""

    hourly: int = 24
    daily: int = 7
    weekly: int = 4
    monthly: int = 12

    @classmethod
    def parse(cls, text: str) -> Policy:
        """`hourly=24,daily=7,weekly=4,monthly=12` (any subset; the rest default).
        Raises ValueError naming what is wrong."""
        values: dict[str, int] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            name, _, count = part.partition("=")
            if name not in BUCKETS or not count.isdigit():
                raise ValueError(f"{part!r}: expected hourly=N, daily=N, weekly=N or "
                                 f"monthly=N with N a whole number")
            values[name] = int(count)
        return cls(**values)


@dataclass(frozen=True)
class Backup:
    """One backup of a target as retention sees it."""

    backup_id: str
    taken_at: datetime
    verified: bool


def kept(backups: Iterable[Backup], policy: Policy) -> set[str]:
    """The ids GFS keeps among the verified backups."""
    good = sorted((b for b in backups if b.verified), key=lambda b: b.taken_at, reverse=True)
    keep = {good[0].backup_id} if good else set()
    for kind, bucket in BUCKETS.items():
        seen: set[tuple[int, ...]] = set()
        for b in good:
            key = bucket(b.taken_at)
            if key in seen:
                continue
            if len(seen) >= getattr(policy, kind):
                break
            seen.add(key)
            keep.add(b.backup_id)
    return keep


def prunable(backups: Iterable[Backup], policy: Policy) -> list[str]:
    """The verified backups to prune, oldest first: those GFS does not keep."""
    backups = list(backups)
    keep = kept(backups, policy)
    return [b.backup_id for b in sorted(backups, key=lambda b: b.taken_at)
            if b.verified and b.backup_id not in keep]


def expired(backups: Iterable[Backup], now: datetime, keep: timedelta) -> list[str]:
    """Final backups (taken before an add-on was destroyed, outside GFS) older than `keep`,
    an operator's choice: the ids to prune, oldest first."""
    return [b.backup_id for b in sorted(backups, key=lambda b: b.taken_at)
            if now - b.taken_at > keep]
