"""`tally backups:restore`: a new ledger data folder from the repository alone (the live
ledger may be gone): the newest verified base backup before the target, then the archived
WAL replayed up to it, on a scratch port, with progress.

- `--at TIME`: PostgreSQL's own point-in-time recovery (recovery_target_time): every
  transaction committed by then, none after.
- `--at POSITION`: the archive is replayed to its end, then every event placed after the
  position (and any not placed yet) is removed (ledger/digest.py `cut_after`): exactly the
  events up to it. Refused if the archive does not reach the position.
- neither: everything the archive holds.
The result says the restored head; with `check` (`--check`) also the events' count and
digest up to it, comparable with the live ledger's (ledger/digest.py), at the cost of a
full read of the events. Derived tables (views, checkpoints) are as they
were at the end of replay: rebuild the views (`tally projectors rebuild all`) on a
restored ledger before serving from it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2

from agents.backups.base import BackupError, Progress
from agents.backups.repository import Repository
from agents.backups.scratch import ScratchServer, chown_tree, copy_tree
from agents.backups.walcheck import wal_segment
from ledger import digest
from ledger.cluster import Cluster


@dataclass(frozen=True)
class Target:
    """Where to stop: a time, a position, or (both None) the end of the archive."""

    time: datetime | None = None
    position: int | None = None


def parse_target(text: str | None) -> Target:
    """A whole number is a position, anything else an ISO time with its zone."""
    if not text:
        return Target()
    if text.isdigit():
        return Target(position=int(text))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--at {text!r}: expected a ledger position or an ISO 8601 time "
                         f"such as 2026-12-06T09:30:00Z") from None
    if when.tzinfo is None:
        raise ValueError(f"--at {text!r}: say the time zone (e.g. a trailing Z for UTC)")
    return Target(time=when)


@dataclass(frozen=True)
class Restored:
    into: str
    backup_id: str
    position: int
    events: int | None
    """With `check`: the events up to `position` (retention's categories left out)."""
    digest: str | None
    """With `check`: their digest (ledger/digest.py), comparable with the live ledger's."""
    removed_after: int
    bytes_copied: int
    wal_segments: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def verified_backups(repo: Repository) -> list[dict[str, Any]]:
    """The verified base backups the repository holds (their sidecars), oldest first."""
    out = []
    for path in sorted(repo.base_dir.glob("*.json")):
        info = json.loads(path.read_text())
        if info.get("verified") and repo.base(info["backup_id"]).is_dir():
            out.append(info)
    return sorted(out, key=lambda i: i["finished_at"])


def choose(backups: list[dict[str, Any]], target: Target,
           backup_id: str | None = None) -> dict[str, Any]:
    """The base backup to start from: the named one, else the newest that ended before the
    target time or holds no more than the target position."""
    if backup_id is not None:
        named = [b for b in backups if b["backup_id"] == backup_id]
        if not named:
            raise BackupError(f"no verified base backup {backup_id} in the repository")
        return named[0]
    fits = [b for b in backups
            if (target.time is None or datetime.fromisoformat(b["finished_at"]) < target.time)
            and (target.position is None or b["verified"]["position"] <= target.position)]
    if not fits:
        raise BackupError("no verified base backup in the repository is old enough for "
                          "that target" if backups else
                          "the repository holds no verified base backup")
    return fits[-1]


def _stage_wal(repo: Repository, start: str, folder: Path) -> int:
    """Copy the archived WAL from the base backup's start on (and every timeline history)
    where the restoring server's restore_command finds it."""
    folder.mkdir(mode=0o700)
    count = 0
    for name in repo.wal_segments():
        if name.endswith(".history") or name[8:24] >= start[8:]:
            shutil.copyfile(repo.wal_dir / name, folder / name)
            count += 1
    return count


def restore(repo: Repository, into: Path, target: Target, live: Cluster,
            backup_id: str | None = None, progress: Progress | None = None,
            say: Callable[[str], None] = lambda line: None, check: bool = False) -> Restored:
    """Build the data folder `into` (new or empty) and return what it holds; with
    `check`, its events' count and digest too (a full read of them)."""
    started = time.monotonic()
    if into.exists() and any(into.iterdir()):
        raise BackupError(f"{into} is not empty: restore into a new folder")
    chosen = choose(verified_backups(repo), target, backup_id)
    say(f"starting from base backup {chosen['backup_id']} (position "
        f"{chosen['verified']['position']}, ended {chosen['finished_at']})")
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    copied = copy_tree(repo.base(chosen["backup_id"]), into, progress)
    run_dir = into / "tally_restore"
    wal = run_dir / "wal"
    run_dir.mkdir(mode=0o700)
    segments = _stage_wal(repo, wal_segment(chosen["timeline"], chosen["start_lsn"]), wal)
    say(f"replaying {segments} archived WAL file(s)")
    chown_tree(into, live.spec.os_user)
    server = ScratchServer(into, live.spec.bin_dir, live.spec.os_user, run_dir=run_dir)
    extra = {"_recovery": "1", "restore_command": f"cp {wal}/%f %p",
             "recovery_target_action": "promote", "recovery_target_timeline": "latest"}
    if target.time is not None:
        extra["recovery_target_time"] = target.time.isoformat()
    password = live.credentials()["postgres"]
    shown = [0.0]

    def moved(lsn: str) -> None:
        if time.monotonic() - shown[0] > 2:
            say(f"replayed up to {lsn}")
            shown[0] = time.monotonic()

    try:
        server.start(extra, timeout=3600)
        server.wait_promoted(password, 3600, moved)
        conn = server.connect(password)
        try:
            removed = 0
            if target.position is not None:
                reached = digest.head(conn)
                if reached < target.position:
                    raise BackupError(f"the archive reaches position {reached} only, not "
                                      f"{target.position}")
                removed = digest.cut_after(conn, target.position)
            found = (digest.digest(conn, connect=lambda: server.connect(password)) if check
                     else digest.Digest(digest.head(conn), -1, ""))
        finally:
            conn.close()
    except psycopg2.Error as exc:
        raise BackupError(f"the restored ledger could not be read: {str(exc).strip()}") \
            from exc
    finally:
        server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    return Restored(str(into), chosen["backup_id"], found.position,
                    found.events if check else None, found.sha256 if check else None,
                    removed, copied, segments,
                    round(time.monotonic() - started, 3))
