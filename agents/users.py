"""One Unix user per app, so an app cannot read another app's files or the agent's own.

Created by the agent when it runs as root (a system user with its own group, no login
shell), with the uid the ledger handed the app (ledger/uids.py: never handed out twice);
when the agent is not root, apps run as the agent's user and this is a no-op. When a
deleted app's user goes, so does everything of its uid: processes and files in /tmp,
/var/tmp and /dev/shm.
Users are named <prefix><app> (`prefix`: the platform's, TALLY_APP_USER_PREFIX, default
`tally-`): the names are machine-wide, so two platforms on one machine (test sessions side
by side, each with its own ledger) take different prefixes, as they take different uid
blocks; with one prefix, one platform's agent would take the other's user of the same app
name as an earlier app of its own and remove it.
Linux user names are at most 32 characters: long app names keep a prefix and a hash
(user_name).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class AppUser:
    name: str
    uid: int
    gid: int


DEFAULT_PREFIX = "tally-"
PREFIX = re.compile(r"[a-z_][a-z0-9_-]{0,14}")
"""A prefix leaves Linux's 32 characters room for the long form's `_` and hash."""


def user_name(app: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`<prefix><app>`, or for names too long for Linux's 32 characters
    `<prefix><first letters>_<64 bits of sha256>` (`tally-<first 9>_...` with the default
    prefix): app names never hold `_`, so no app's short name is another's long one (with
    `-` it was: `payments-service-p-e474b90` took the user of
    `payments-service-production-eu`), and 64 bits are out of reach of a search for a
    second long name."""
    name = f"{prefix}{app}"
    if len(name) <= 32:
        return name
    keep = 32 - len(prefix) - 17
    return f"{prefix}{app[:keep]}_{hashlib.sha256(app.encode()).hexdigest()[:16]}"


def ensure(app: str, home: Path, uid: int | None = None,
           prefix: str = DEFAULT_PREFIX) -> AppUser | None:
    """The app's user, created if missing, with the uid the ledger gave the app
    (AppCreated); None when not running as root. A user of that name with another uid is
    an earlier app of the same name: it goes first (its uid is never reused). A uid held
    by another name is refused: two tenants never share one."""
    if os.geteuid() != 0:
        return None
    name = user_name(app, prefix)
    entry = _entry(name)
    if entry is not None and uid is not None and entry.pw_uid != uid:
        remove(app, prefix=prefix)
        entry = None
    if entry is None:
        if uid is not None:
            _check_free(uid, name)
        entry = _create(name, home, uid)
    return AppUser(name, entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_gid)


def _entry(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _check_free(uid: int, name: str) -> None:
    for taken in (_name_of(pwd.getpwuid, uid), _name_of(grp.getgrgid, uid)):
        if taken not in (None, name):
            raise OSError(f"cannot create user {name} with uid {uid}: {taken} has it "
                          "(keep TALLY_APP_UIDS clear of this machine's other users)")


def _name_of(lookup: Callable[[int], Any], uid: int) -> str | None:
    try:
        return lookup(uid)[0]
    except KeyError:
        return None


def _create(name: str, home: Path, uid: int | None) -> pwd.struct_passwd:
    ids: list[str] = []
    if uid is not None:
        if _name_of(grp.getgrgid, uid) is None:
            subprocess.run(["groupadd", "--gid", str(uid), name], capture_output=True)
        ids = ["--uid", str(uid), "--gid", str(uid)]
    proc = subprocess.run(["useradd", "--system", *ids, *([] if ids else ["--user-group"]),
                           "--no-create-home", "--home-dir", str(home),
                           "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    entry = _entry(name)  # another agent on this machine may have created it meanwhile
    if entry is None:
        raise OSError(f"cannot create user {name}: {proc.stderr.strip()}")
    return entry


LEFTOVER_ROOTS = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))
"""Where any user may leave files: a deleted app's are removed with its user."""


def remove(app: str, leftovers: tuple[Path, ...] = LEFTOVER_ROOTS,
           prefix: str = DEFAULT_PREFIX) -> None:
    """Delete the app's user and its group, after killing what still runs under its uid
    outside the agents' records and removing the files it left in `leftovers`. Raises
    OSError if userdel refuses."""
    if os.geteuid() != 0:
        return
    name = user_name(app, prefix)
    entry = _entry(name)
    if entry is None:
        return
    kill_all(entry.pw_uid)
    for root in leftovers:
        remove_files_of(entry.pw_uid, root)
    proc = subprocess.run(["userdel", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"cannot remove user {name}: {proc.stderr.strip()}")
    subprocess.run(["groupdel", name], capture_output=True)  # if userdel left it


def kill_all(uid: int) -> None:
    """SIGKILL every process of the uid (a deleted app's: nothing of it may stay)."""
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids is not None and uid in (uids.real, uids.effective, uids.saved):
            with contextlib.suppress(psutil.Error):
                proc.kill()
    psutil.wait_procs([p for p in psutil.process_iter(["uids"])
                       if p.info["uids"] is not None and p.info["uids"].real == uid], 5)


def remove_files_of(uid: int, root: Path) -> None:
    """Remove everything under root owned by uid; a folder of its is removed whole; never
    leaving root's filesystem. Root does this while other apps run: every name is looked
    at and removed in a folder already open (os.fwalk's descriptors, which never follow a
    link and skip a folder swapped for one; unlink and rmtree with `dir_fd`), so an app
    that swaps a folder on the path for a link to /etc between the look and the removal
    cannot turn it onto root's files."""
    if not root.is_dir():
        return
    device = root.stat().st_dev
    for _, dirnames, filenames, folder in os.fwalk(root):
        for name in [*dirnames, *filenames]:
            try:
                st = os.stat(name, dir_fd=folder, follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != device:
                if name in dirnames:
                    dirnames.remove(name)
                continue
            if st.st_uid != uid:
                continue
            if stat.S_ISDIR(st.st_mode):
                dirnames.remove(name)
                shutil.rmtree(name, dir_fd=folder, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=folder)


def private_home(path: Path, user: AppUser | None) -> Path:
    """A writable folder only the app's user may enter."""
    path.mkdir(parents=True, exist_ok=True)
    if user is not None:
        os.chown(path, user.uid, user.gid)
        path.chmod(0o700)
    return path


def share_with_group(root: Path, gid: int) -> None:
    """A read-only release readable by the app's group only: root:<app>, no bits for others."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            os.chown(p, 0, gid)
            p.chmod(p.stat().st_mode & 0o550)
    os.chown(root, 0, gid)
    root.chmod(0o550)
