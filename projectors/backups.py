"""The backups view, per target: the last good backup, the last failure, what runs now,
and the retained set (what a restore can choose from). A backup is good only once
verified: a completed one is retained unverified, and one that then fails leaves the set."""

from __future__ import annotations

from typing import Any

from ledger.events import RecordedEvent
from projectors.projector import Projector, handlers_of, handles
from projectors.tables import Row, Tables


def _target(t: Tables, e: RecordedEvent) -> Row:
    return t.get("backups", e.data["target"]) or {
        "target": e.data["target"], "last_ok_backup_id": None, "last_ok_at": None,
        "last_ok_position": None, "last_failure_backup_id": None, "last_failure_at": None,
        "last_failure_error": None, "last_failure_position": None, "running": {},
        "retained": [], "position": e.position,
    }


def _put(t: Tables, e: RecordedEvent, **changes: Any) -> None:
    t.put("backups", {**_target(t, e), **changes, "position": e.position})


def _not_running(t: Tables, e: RecordedEvent) -> dict[str, Any]:
    running = dict(_target(t, e)["running"])
    running.pop(e.data["backup_id"], None)
    return running


@handles("BackupStarted")
def started(t: Tables, e: RecordedEvent) -> None:
    running = {**_target(t, e)["running"],
               e.data["backup_id"]: {"kind": e.data.get("kind", "full"),
                                     "started_position": e.position}}
    _put(t, e, running=running)


@handles("BackupCompleted")
def completed(t: Tables, e: RecordedEvent) -> None:
    d = e.data
    kept = {"backup_id": d["backup_id"], "completed_at": e.recorded_at.isoformat(),
            "size_bytes": d["size_bytes"], "location": d["location"], "digest": d["digest"],
            "verified": False, "position": e.position}
    retained = [r for r in _target(t, e)["retained"] if r["backup_id"] != d["backup_id"]]
    _put(t, e, running=_not_running(t, e), retained=[*retained, kept])


@handles("BackupVerified")
def verified(t: Tables, e: RecordedEvent) -> None:
    retained = [{**r, "verified": True} if r["backup_id"] == e.data["backup_id"] else r
                for r in _target(t, e)["retained"]]
    _put(t, e, retained=retained, last_ok_backup_id=e.data["backup_id"],
         last_ok_at=e.recorded_at, last_ok_position=e.position)


@handles("BackupFailed")
def failed(t: Tables, e: RecordedEvent) -> None:
    retained = [r for r in _target(t, e)["retained"] if r["backup_id"] != e.data["backup_id"]]
    _put(t, e, running=_not_running(t, e), retained=retained,
         last_failure_backup_id=e.data["backup_id"],
         last_failure_at=e.recorded_at, last_failure_error=e.data["error"],
         last_failure_position=e.position)


@handles("BackupPruned")
def pruned(t: Tables, e: RecordedEvent) -> None:
    retained = [r for r in _target(t, e)["retained"] if r["backup_id"] != e.data["backup_id"]]
    _put(t, e, retained=retained)


PROJECTOR = Projector(
    name="backups",
    tables={"backups": ("target",)},
    public=("backups",),
    handlers=handlers_of(started, completed, verified, failed, pruned),
)
