"""The backups as the ledger tells them, folded per backup: the agent's one view of what
was started, finished, checked, failed and pruned (a pure fold over recorded events)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from agents.backups import gfs
from ledger.events import RecordedEvent

TYPES = ("BackupStarted", "BackupCompleted", "BackupVerified", "BackupFailed", "BackupPruned")
STREAM = "backup-{target}"


def stream_of(target: str) -> str:
    return STREAM.format(target=target)


@dataclass(frozen=True)
class Backup:
    """One backup's story so far."""

    backup_id: str
    target: str
    started_at: datetime
    job: str = ""
    scheduled_for: str | None = None
    agent: str = ""
    completed: dict[str, Any] | None = None
    verified: dict[str, Any] | None = None
    failed: str | None = None
    pruned: bool = False
    events: tuple[int | None, ...] = field(default=())

    @property
    def state(self) -> str:
        """running, completed (unverified), verified, failed or pruned."""
        if self.pruned:
            return "pruned"
        if self.failed is not None:
            return "failed"
        if self.verified is not None:
            return "verified"
        return "completed" if self.completed is not None else "running"

    @property
    def finished(self) -> bool:
        return self.state in ("verified", "failed", "pruned")

    def as_dict(self) -> dict[str, Any]:
        c, v = self.completed or {}, self.verified or {}
        return {"backup_id": self.backup_id, "target": self.target, "state": self.state,
                "started_at": self.started_at.isoformat(), "job": self.job,
                "scheduled_for": self.scheduled_for, "size_bytes": c.get("size_bytes"),
                "duration_s": c.get("duration_s"), "position": v.get("position",
                                                                      c.get("position")),
                "events": v.get("events"), "error": self.failed,
                "location": c.get("location")}


def fold(events: Iterable[RecordedEvent]) -> dict[str, Backup]:
    """Every backup by id, in the order they started."""
    out: dict[str, Backup] = {}
    for e in events:
        d, bid = e.data, e.data["backup_id"]
        b = out.get(bid)
        if e.type == "BackupStarted":
            out[bid] = Backup(bid, d["target"], e.recorded_at, d.get("job", ""),
                              d.get("scheduled_for"), d.get("agent", ""), events=(e.position,))
            continue
        if b is None:  # a failure recorded without a start (a skipped run)
            b = Backup(bid, d["target"], e.recorded_at)
        b = replace(b, events=(*b.events, e.position))
        if e.type == "BackupCompleted":
            b = replace(b, completed=dict(d))
        elif e.type == "BackupVerified":
            b = replace(b, verified=dict(d))
        elif e.type == "BackupFailed":
            b = replace(b, failed=d["error"])
        elif e.type == "BackupPruned":
            b = replace(b, pruned=True)
        out[bid] = b
    return out


FINAL = "final"
"""The job of a backup taken before an add-on was destroyed: kept for the operator's period
(`--keep-final`), outside GFS."""


def retention_view(backups: Iterable[Backup], target: str) -> list[gfs.Backup]:
    """The target's backups that GFS weighs: those still held, good or being made, but
    final ones."""
    return [gfs.Backup(b.backup_id, b.started_at, b.state == "verified")
            for b in backups if b.target == target and b.job != FINAL
            and b.state in ("running", "completed", "verified")]


def finals(backups: Iterable[Backup]) -> list[gfs.Backup]:
    """The backups held of targets that are gone: every one of a target whose newest
    backup is a final one (its add-on was destroyed after it)."""
    held = [b for b in backups if b.state in ("completed", "verified")]
    newest: dict[str, Backup] = {}
    for b in held:
        if b.target not in newest or b.started_at >= newest[b.target].started_at:
            newest[b.target] = b
    return [gfs.Backup(b.backup_id, b.started_at, True) for b in held
            if newest[b.target].job == FINAL]


def last_scheduled(backups: Iterable[Backup], job: str) -> str | None:
    """The latest scheduled time a run of `job` was claimed for (ISO, UTC)."""
    times = [b.scheduled_for for b in backups if b.job == job and b.scheduled_for]
    return max(times) if times else None
