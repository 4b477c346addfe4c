"""The backup repository: a folder outside every database server's data folder, owned by
root (0700), which the servers' `postgres` user can neither read, write nor delete in, and
no app can reach ("no access to backups from servers"; in production, another machine).

    <repo>/ledger/base/<backup_id>/        a base backup (pg_basebackup, plain, manifest)
    <repo>/ledger/base/<backup_id>.partial  one being taken (never counted, removed on crash)
    <repo>/ledger/wal/<segment>            the archived WAL, for point-in-time restores
    <repo>/addons/<app>/<backup_id>.dump    an add-on database (pg_dump -Fc)

WAL reaches it through a spool: the servers' archive_command (`archive_command`) copies each
finished segment into a folder of postgres's beside the cluster's sockets, outside its data
folders, and the backup agent moves it into the repository (`ingest_wal`). The server can
only add to the spool; a segment already in the repository is never replaced, so a server
gone bad cannot rewrite history. While no agent runs, segments wait in the spool.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shlex
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

WAL_NAME = re.compile(r"^[0-9A-F]{24}(\.partial|\.[0-9A-F]{8}\.backup)?\Z|^[0-9A-F]{8}\.history\Z")
SPOOL = "wal-spool"


def archive_command(spool: Path) -> str:
    """The servers' archive_command: copy the segment into the spool, on disk before it is
    named, so the agent never takes a half-written file."""
    d = shlex.quote(str(spool))
    return (f"mkdir -p {d} && cp %p {d}/%f.part && sync {d}/%f.part "
            f"&& mv -f {d}/%f.part {d}/%f")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Repository:
    """Where backups live; every path of it is made here."""

    root: Path

    def open(self) -> Repository:
        """Make the folders (root-owned, 0700, whoever made them before) and return self."""
        for path in (self.root, self.root / "ledger", self.base_dir, self.wal_dir,
                     self.addons_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if os.geteuid() == 0:
                os.chown(path, 0, 0)
            path.chmod(0o700)
        return self

    @property
    def base_dir(self) -> Path:
        return self.root / "ledger" / "base"

    @property
    def wal_dir(self) -> Path:
        return self.root / "ledger" / "wal"

    @property
    def addons_dir(self) -> Path:
        return self.root / "addons"

    def base(self, backup_id: str) -> Path:
        return self.base_dir / backup_id

    def partial(self, backup_id: str) -> Path:
        return self.base_dir / f"{backup_id}.partial"

    def dump(self, app: str, backup_id: str) -> Path:
        return self.addons_dir / app / f"{backup_id}.dump"

    def rdb(self, app: str, backup_id: str) -> Path:
        return self.addons_dir / app / f"{backup_id}.rdb"

    def remove(self, backup_id: str) -> None:
        """Remove a base backup, finished or partial (pruned, failed, or left by a crash)."""
        for path in (self.base(backup_id), self.partial(backup_id)):
            shutil.rmtree(path, ignore_errors=True)

    def ingest_wal(self, spool: Path) -> list[str]:
        """Move every finished segment from the spool into the repository (written and
        fsynced under a temporary name, then renamed); returns the names taken. A name
        already archived is kept as it is: the spool's copy is dropped. The spool is the
        servers' (postgres can write there): neither it nor a file in it is followed if
        it is a link, and only regular files are taken, so a server gone bad cannot make
        root copy another file into the repository."""
        taken: list[str] = []
        try:
            folder = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError):
            return taken
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return taken  # a link where the spool should be: not ours to follow
            raise
        try:
            for name in sorted(os.listdir(folder)):
                if not WAL_NAME.match(name):
                    continue  # a `.part` being written, or something that is not WAL
                if self._take(folder, name):
                    taken.append(name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)
        if taken:
            _fsync_dir(self.wal_dir)
        return taken

    def _take(self, folder: int, name: str) -> bool:
        """Copy one spooled segment in, unless archived already or not a regular file."""
        target = self.wal_dir / name
        if target.exists():
            return False
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
        except OSError:
            return False  # a link, or gone meanwhile
        with os.fdopen(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
                return False
            tmp = self.wal_dir / f".{name}.tmp"
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        tmp.chmod(0o600)
        os.replace(tmp, target)
        return True

    def wal_segments(self) -> list[str]:
        return sorted(p.name for p in self.wal_dir.iterdir() if WAL_NAME.match(p.name))
