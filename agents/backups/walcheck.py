"""Is the WAL archive whole? Point-in-time recovery from a base backup replays every
segment from the backup's start on: one segment missing (a spool a server gone bad
emptied, a disk error, a hand) and replay stops there, silently, unless someone looks.
Pure functions over segment names; the agent records what they find (WalGapFound) and
fails a verification on it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SEGMENT_BYTES = 16 << 20
"""PostgreSQL's default WAL segment size, which tally's clusters use."""


def wal_segment(timeline: int, lsn: str, segment_bytes: int = SEGMENT_BYTES) -> str:
    """The WAL file holding `lsn` ('0/4000028') on `timeline`."""
    hi, lo = (int(x, 16) for x in lsn.split("/"))
    per_id = 0x1_0000_0000 // segment_bytes
    return f"{timeline:08X}{hi:08X}{lo // segment_bytes % per_id:08X}"


def number(name: str, segment_bytes: int = SEGMENT_BYTES) -> int:
    """A segment's place in the WAL, whatever its timeline."""
    return int(name[8:16], 16) * (0x1_0000_0000 // segment_bytes) + int(name[16:24], 16)


def name_of(timeline: int, n: int, segment_bytes: int = SEGMENT_BYTES) -> str:
    per_id = 0x1_0000_0000 // segment_bytes
    return f"{timeline:08X}{n // per_id:08X}{n % per_id:08X}"


@dataclass(frozen=True)
class Gap:
    """Segments missing from the archive, `first` to `last` (names on the timeline of the
    segment archived before them)."""

    first: str
    last: str

    def __str__(self) -> str:
        return self.first if self.first == self.last else f"{self.first}..{self.last}"


def gaps(archived: Iterable[str], since: str,
         segment_bytes: int = SEGMENT_BYTES) -> list[Gap]:
    """The runs of segments missing between `since` (the first segment needed) and the
    newest archived one. Segments are counted across timelines: after a failover the new
    timeline carries on from the old one's last segment, which it holds again. A segment
    newer than every archived one is not missing yet (it is being written or archived)."""
    whole = sorted({(number(n, segment_bytes), int(n[:8], 16)) for n in archived
                    if len(n) == 24})
    start = number(since, segment_bytes)
    held = [(n, tl) for n, tl in whole if n >= start]
    out = []
    expected, timeline = start, int(since[:8], 16)
    for n, tl in held:
        if n > expected:
            out.append(Gap(name_of(timeline, expected, segment_bytes),
                           name_of(timeline, n - 1, segment_bytes)))
        expected, timeline = max(expected, n + 1), tl
    return out


def cuts(archived: list[str], starts: dict[str, str],
         segment_bytes: int = SEGMENT_BYTES) -> list[tuple[Gap, list[str]]]:
    """The gaps since the oldest of the base backups' starts ({id: first segment}), each
    with the backups whose point-in-time range it cuts (those that start before it)."""
    if not starts:
        return []
    oldest = min(starts.values(), key=lambda s: number(s, segment_bytes))
    return [(gap, sorted(bid for bid, start in starts.items()
                         if number(start, segment_bytes) <= number(gap.first, segment_bytes)))
            for gap in gaps(archived, oldest, segment_bytes)]


def summary(archived: list[str], starts: dict[str, str]) -> str:
    """One line for people: the archive's span, and each gap with what it cuts."""
    found = cuts(archived, starts)
    whole = sorted((n for n in archived if len(n) == 24), key=number)
    if not whole:
        return "WAL archive: empty"
    span = f"WAL archive: {len(whole)} segments, {whole[0]} to {whole[-1]}"
    if not found:
        return f"{span}, no gap"
    return span + "; " + "; ".join(
        f"MISSING {gap} (point-in-time recovery from {', '.join(cut)} stops before it)"
        for gap, cut in found)
