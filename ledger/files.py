"""Files root writes into folders a database server's user owns (its data and run
folders): that user may have planted a link at the name, to make root write, truncate or
give away a file of root's choosing. So the name is opened without following a link, must
be a regular file, and is handed over by descriptor, never by name."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from pathlib import Path


def server_user(os_user: str) -> str | None:
    """Who a server's files and processes belong to: its user when we are root (the one
    case where ownership can be given), else None (they stay ours, the only user there is)."""
    return os_user if os.geteuid() == 0 else None


def hand_over(path: Path, os_user: str) -> None:
    """Give a file or folder root made for a server to the server's user (root only)."""
    if os.geteuid() == 0:
        shutil.chown(path, os_user, os_user)


def write_for(path: Path, text: str, owner: str | None = None, mode: int = 0o600) -> None:
    """Write `text` to `path` (created with `mode`), owned by `owner` when root (else ours).
    Raises OSError on a link or anything but a regular file at the name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file: not written")
        os.ftruncate(fd, 0)
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            entry = pwd.getpwnam(owner)
            os.fchown(fd, entry.pw_uid, entry.pw_gid)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
