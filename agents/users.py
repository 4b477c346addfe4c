"""One Unix user per app, so an app cannot read another app's files or the agent's own.

Created by the agent when it runs as root (a system user with its own group, no login
shell); when the agent is not root, apps run as the agent's user and this is a no-op.
Linux user names are at most 32 characters: long app names keep a prefix and a hash.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AppUser:
    name: str
    uid: int
    gid: int


def user_name(app: str) -> str:
    name = f"tally-{app}"
    if len(name) <= 32:
        return name
    return f"tally-{app[:18]}-{hashlib.sha256(app.encode()).hexdigest()[:7]}"


def ensure(app: str, home: Path) -> AppUser | None:
    """The app's user, created if missing; None when not running as root."""
    if os.geteuid() != 0:
        return None
    name = user_name(app)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                               "--home-dir", str(home), "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True)
        try:  # another agent on this machine may have created it meanwhile
            entry = pwd.getpwnam(name)
        except KeyError:
            raise OSError(f"cannot create user {name}: {proc.stderr.strip()}") from None
    return AppUser(name, entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_gid)


def remove(app: str) -> None:
    """Delete the app's user and its group. Raises OSError while a process of the user
    still runs (userdel refuses), e.g. under another agent on this machine."""
    if os.geteuid() != 0:
        return
    name = user_name(app)
    try:
        pwd.getpwnam(name)
    except KeyError:
        return
    proc = subprocess.run(["userdel", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(f"cannot remove user {name}: {proc.stderr.strip()}")


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
