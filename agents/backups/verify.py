"""Every backup is checked before it counts: first its files against its manifest
(pg_verifybackup: every file's checksum, and the WAL it needs parsed), then restored on a
scratch port and compared with the live ledger (the events up to the copy's head: their
number and digest, ledger/digest.py). Any difference is a BackupError; the agent records
it as BackupFailed and the backup is never counted as good."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from agents.backups.base import BackupError
from agents.backups.scratch import chown_tree, copy_tree, scratch_server
from ledger import digest
from ledger.cluster import Cluster


@dataclass(frozen=True)
class Checked:
    """What the check found in the copy."""

    position: int
    events: int
    sha256: str
    seconds: float


def verify_files(backup: Path, bin_dir: Path) -> None:
    """pg_verifybackup: every file as the manifest says, and its WAL readable."""
    proc = subprocess.run([str(bin_dir / "pg_verifybackup"), "--quiet", str(backup)],
                          capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BackupError("pg_verifybackup: " + " | ".join(lines[:4]))


def verify(cluster: Cluster, backup: Path, scratch_root: Path, name: str) -> Checked:
    """Check the base backup in `backup`; raises BackupError saying what did not match."""
    started = time.monotonic()
    bin_dir = cluster.spec.bin_dir
    verify_files(backup, bin_dir)
    with scratch_server(scratch_root, name, bin_dir, cluster.spec.os_user,
                        "the restored copy") as server:
        copy_tree(backup, server.data)
        (server.data / "backup_manifest").unlink(missing_ok=True)
        chown_tree(server.data, cluster.spec.os_user)
        server.start()
        password = cluster.credentials()["postgres"]
        copy = server.connect(password)
        try:
            found = digest.digest(copy, connect=lambda: server.connect(password))
        finally:
            copy.close()
        live = psycopg2.connect(cluster.dsn("tally_reader"), application_name="tally-backup")
        try:
            expected = digest.digest(live, found.position, connect=lambda: psycopg2.connect(
                cluster.dsn("tally_reader"), application_name="tally-backup"))
        finally:
            live.close()
    if (found.events, found.sha256) != (expected.events, expected.sha256):
        raise BackupError(
            f"the restored copy differs from the ledger up to position {found.position}: "
            f"{found.events} events (digest {found.sha256[:12]}) vs {expected.events} "
            f"(digest {expected.sha256[:12]})")
    return Checked(found.position, found.events, found.sha256,
                   round(time.monotonic() - started, 3))
