"""A base backup of the ledger: pg_basebackup of the primary (plain format, WAL streamed in,
a manifest of every file's checksum) into the repository under a `.partial` name, renamed
only once complete. A process killed meanwhile leaves a `.partial` that nothing counts and
the agent removes (agents/backups/jobs.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agents.backups.repository import Repository, tree_size
from agents.bundle import digest_of
from ledger.cluster import Cluster
from ledger.errors import ClusterError

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes expected) as the work goes."""
_PROGRESS = re.compile(rb"(\d+)/(\d+) kB")


class LoggedProgress:
    """Progress into the agent's log, for backups no terminal watches (the scheduled
    ones): a line at each tenth, with the rate so far."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self.what, self.log = what, log
        self.started = time.monotonic()
        self.tenth = -1

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // total if total else 0
        if tenth <= self.tenth:
            return
        self.tenth = tenth
        seconds = max(time.monotonic() - self.started, 1e-6)
        self.log.info("%s: %d%% (%.1f of %.1f MB, %.1f MB/s)", self.what, 10 * tenth,
                      done / 1e6, total / 1e6, done / 1e6 / seconds)


class BackupError(Exception):
    """A backup or its check failed; the message says why (recorded as BackupFailed)."""


@dataclass(frozen=True)
class Taken:
    """What one base backup holds: where, how big, and its WAL range."""

    backup_id: str
    location: str
    size_bytes: int
    manifest_sha256: str
    duration_s: float
    timeline: int
    start_lsn: str
    end_lsn: str
    position: int
    """The ledger's head read just before the backup began: every event up to it is in."""
    finished_at: str
    """When it ended (ISO, UTC): a restore to a later time may start from it."""


def run_with_progress(cmd: list[str], env: dict[str, str], progress: Progress | None,
                      max_tail: int = 4000) -> None:
    """Run a PostgreSQL client tool, feeding its `-P` progress (`N/M kB`) to `progress`;
    BackupError with the end of its output if it fails."""
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env={**os.environ, "LC_ALL": "C.UTF-8", **env}, cwd="/") as proc:
        assert proc.stderr is not None
        tail = b""
        while chunk := os.read(proc.stderr.fileno(), 4096):
            tail = (tail + chunk)[-max_tail:]
            if progress is not None:
                found = _PROGRESS.findall(chunk)
                if found:
                    done, total = found[-1]
                    progress(int(done) * 1024, int(total) * 1024)
    if proc.wait() != 0:
        lines = [ln for ln in re.split(rb"[\r\n]", tail) if ln.strip()
                 and not _PROGRESS.search(ln)]
        raise BackupError(f"{Path(cmd[0]).name} failed: "
                          + " | ".join(ln.decode(errors="replace") for ln in lines[-4:]))


def wal_range(backup: Path) -> tuple[int, str, str]:
    """(timeline, start LSN, end LSN) from the backup's manifest."""
    manifest = json.loads((backup / "backup_manifest").read_text())
    first, last = manifest["WAL-Ranges"][0], manifest["WAL-Ranges"][-1]
    return int(last["Timeline"]), first["Start-LSN"], last["End-LSN"]


def take(cluster: Cluster, repo: Repository, backup_id: str, position: int,
         progress: Progress | None = None, max_rate: str | None = None) -> Taken:
    """pg_basebackup of the primary into `<repo>/ledger/base/<backup_id>`."""
    started = time.monotonic()
    partial, final = repo.partial(backup_id), repo.base(backup_id)
    repo.remove(backup_id)
    try:
        node = cluster.primary()
    except ClusterError as exc:
        raise BackupError(f"no primary to back up: {exc}") from exc
    cmd = [str(cluster.spec.bin_dir / "pg_basebackup"), "-h", cluster.spec.host,
           "-p", str(cluster.port(node)), "-U", "tally_replicator", "-D", str(partial),
           "-X", "stream", "--checkpoint=fast", "-P", "--no-password"]
    if max_rate:
        cmd += ["--max-rate", max_rate]
    run_with_progress(cmd, {"PGPASSWORD": cluster.credentials()["tally_replicator"],
                            "PGAPPNAME": "tally-backup"}, progress)
    os.replace(partial, final)
    timeline, start_lsn, end_lsn = wal_range(final)
    return Taken(backup_id, str(final.relative_to(repo.root)), tree_size(final),
                 digest_of(final / "backup_manifest"), round(time.monotonic() - started, 3),
                 timeline, start_lsn, end_lsn, position, datetime.now(UTC).isoformat())
