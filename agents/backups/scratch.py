"""A PostgreSQL server started from a copy of a backup, for a check or a restore: on a free
port of its own, listening on 127.0.0.1 only, archiving nothing, waiting for no standby,
run as the `postgres` user (PostgreSQL refuses root) from a folder that user owns.

The copy's own configuration came with the backup (the live node's: its port, its
replication settings, under Patroni its hba file's path); everything that would reach the
live cluster is overridden on the command line, which wins over every file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2

from agents.backups.base import BackupError, Progress

SIGNALS = ("standby.signal", "recovery.signal")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(os_user: str) -> dict[str, Any]:
    return {"user": os_user, "group": os_user} if os.geteuid() == 0 else {}


def chown_tree(path: Path, os_user: str) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", f"{os_user}:{os_user}", str(path)], check=True)


def copy_tree(source: Path, target: Path, progress: Progress | None = None) -> int:
    """Copy a data folder file by file (mode 0700 folders, 0600 files); bytes copied."""
    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    done = 0
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(mode=0o700, exist_ok=True)
            continue
        with open(path, "rb") as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        dest.chmod(0o600)
    return done


class ScratchServer:
    """Start, query and stop a server over the data folder `data` (owned by postgres)."""

    def __init__(self, data: Path, bin_dir: Path, os_user: str = "postgres",
                 port: int | None = None, run_dir: Path | None = None) -> None:
        self.data = data
        self.bin_dir = bin_dir
        self.os_user = os_user
        self.port = port or free_port()
        self.run_dir = run_dir or data.parent
        self.sockets = self.run_dir / "sockets"
        self.log = self.run_dir / "server.log"

    def log_tail(self, lines: int = 4) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def options(self, extra: dict[str, str] | None = None) -> str:
        settings = {
            "port": str(self.port), "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.sockets), "archive_mode": "off",
            "synchronous_standby_names": "", "primary_conninfo": "",
            "primary_slot_name": "", "cluster_name": "tally_scratch",
            "hba_file": str(self.data / "pg_hba.conf"),
            "ident_file": str(self.data / "pg_ident.conf"),
            **(extra or {}),
        }
        return " ".join(f"-c {k}='{v}'" for k, v in settings.items())

    def start(self, extra: dict[str, str] | None = None, timeout: int = 600) -> None:
        """Start it (crash or archive recovery first), waiting until it accepts
        connections; BackupError with its log's end if it does not."""
        for name in SIGNALS:
            (self.data / name).unlink(missing_ok=True)
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        self.sockets.mkdir(mode=0o700, exist_ok=True)
        chown_tree(self.sockets, self.os_user)
        log = self.log
        log.touch(mode=0o600)
        chown_tree(log, self.os_user)
        if extra and extra.pop("_recovery", None):
            (self.data / "recovery.signal").touch()
            chown_tree(self.data / "recovery.signal", self.os_user)
        proc = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "-t",
             str(timeout), "-o", self.options(extra), "start"],
            capture_output=True, text=True, cwd="/", env={**os.environ, "LC_ALL": "C.UTF-8"},
            **as_postgres(self.os_user))
        if proc.returncode != 0:
            raise BackupError(f"the copy did not start: "
                              f"{self.log_tail() or proc.stderr.strip()}")

    def connect(self, password: str, dbname: str = "tally") -> Any:
        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                password=password, dbname=dbname, connect_timeout=5,
                                application_name="tally-backup-check")

    def wait_promoted(self, password: str, timeout: float,
                      moved: Callable[[str], None] | None = None) -> None:
        """Until recovery ended (archive recovery replays, then promotes); `moved` gets the
        replayed position as it advances."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = self.connect(password, "postgres")
            except psycopg2.OperationalError:
                conn = None
                if not (self.data / "postmaster.pid").exists():
                    raise BackupError(f"the server stopped: {self.log_tail()}") from None
            if conn is not None:
                try:
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                        recovering, lsn = cur.fetchone()
                finally:
                    conn.close()
                if not recovering:
                    return
                if moved is not None and lsn:
                    moved(lsn)
            if time.monotonic() > deadline:
                raise BackupError(f"recovery did not end within {timeout:.0f}s")
            time.sleep(0.2)

    def stop(self, mode: str = "fast") -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        subprocess.run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                        "stop"], capture_output=True, cwd="/", **as_postgres(self.os_user))


def clear(folder: Path, bin_dir: Path, os_user: str = "postgres") -> None:
    """Stop a scratch server left running in `folder` (its agent was killed) and remove
    the folder."""
    data = folder / "data"
    if (data / "postmaster.pid").exists():
        with contextlib.suppress(OSError):
            ScratchServer(data, bin_dir, os_user, port=1).stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


def scratch_folder(root: Path, name: str, os_user: str = "postgres") -> Path:
    """`root/name`, fresh: root is root:postgres 0710 (postgres passes, nobody else), the
    folder postgres's own 0700."""
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "root", os_user)
        root.chmod(0o710)
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    chown_tree(folder, os_user)
    return folder


@contextlib.contextmanager
def scratch_server(root: Path, name: str, bin_dir: Path, os_user: str,
                   what: str) -> Iterator[ScratchServer]:
    """A ScratchServer over `root/name/data` (the folder fresh, as scratch_folder makes it;
    the data folder is the caller's to fill). Whatever happens inside, the server is
    stopped and the folder removed on the way out; a psycopg2.Error is a BackupError
    saying `what` could not be read."""
    folder = scratch_folder(root, name, os_user)
    server = ScratchServer(folder / "data", bin_dir, os_user)
    try:
        yield server
    except psycopg2.Error as exc:
        raise BackupError(f"{what} could not be read: {str(exc).strip()}") from exc
    finally:
        server.stop("immediate")
        clear(folder, bin_dir, os_user)
