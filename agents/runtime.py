"""How an instance sees its slug: at /app, writable, its own, and gone when it restarts.

Each instance (and each one-off run) gets a private mount namespace in which an overlay
is mounted at /app: the slug unpacked on this host below (shared by every instance of the
release, never written), a folder of the instance's own above (where every write lands).
So Flask's instance folder, a cache, a SQLite file or collectstatic at start all work as on
Heroku, writes never reach another instance, another release or the slug, and restarting
an instance starts it from a clean copy. `$HOME` is /app, as on Heroku. Mounting costs a
millisecond whatever the slug's size (a copy would cost its size).

The mount is made in the child, as root, before it becomes the app's user: the slug's
folder stays closed to the app (mode 0700 above it), so it cannot write under the overlay.

The same namespace gets a /proc of its own, mounted `hidepid=2`: the app sees its own
uid's processes only, never another app's or the platform's command lines, environments
or open files (the host's /proc, which other tenants' agents and the platform read, is
left as it is: since Linux 5.8 each proc mount has its own options).

And temporary folders of its own: /tmp and /var/tmp are folders of the instance's layer
(on disk, gone with the start), /dev/shm and /run/lock small tmpfs mounts. The host's are
shared by every uid: another tenant could read a temporary file written without a mode,
or take a predictable path first (Django's documented /var/tmp/django_cache holds
pickles). Files are made with umask 077 besides.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

APP_ROOT = "/app"
CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND = 4096
TEMP_FOLDERS = {"tmp": "/tmp", "var-tmp": "/var/tmp"}
"""The layer's folders mounted over the host's temporary folders."""
TEMP_MOUNTS = {"/dev/shm": b"mode=1777,size=64m", "/run/lock": b"mode=1777,size=1m"}
"""Memory-backed temporary folders (charged to the instance's memory cgroup), capped."""
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class MountFailed(OSError):
    """The instance's /app could not be mounted."""


def fresh_layer(folder: Path, uid: int, gid: int) -> tuple[Path, Path]:
    """An empty upper and work folder for one start of an instance (the last start's
    writes are dropped). The upper one is the app's: it becomes /app's top."""
    shutil.rmtree(folder, ignore_errors=True)
    upper, work = folder / "upper", folder / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    folder.chmod(0o700)
    for name in TEMP_FOLDERS:
        (folder / name).mkdir()
        (folder / name).chmod(0o1777)
    os.chown(upper, uid, gid)
    upper.chmod(0o755)
    return upper, work


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MountFailed(err, f"{what}: {os.strerror(err)}")


def enter(lower: Path, upper: Path, work: Path) -> None:
    """In the child (root): a private mount namespace with the overlay at /app, a /proc
    that shows the app only its own processes, and temporary folders of its own."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    options = f"lowerdir={lower},upperdir={upper},workdir={work}".encode()
    _check(_libc.mount(b"overlay", APP_ROOT.encode(), b"overlay", 0, options),
           f"mounting the overlay at {APP_ROOT}")
    _check(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       b"hidepid=2"), "mounting a private /proc (hidepid=2)")
    # Opened first: the layer may itself be under /tmp, which the first mount covers.
    sources = {target: os.open(upper.parent / name, os.O_PATH | os.O_DIRECTORY)
               for name, target in TEMP_FOLDERS.items()}
    for target, fd in sources.items():
        _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND,
                           None), f"mounting a private {target}")
        os.close(fd)
    for target, options in TEMP_MOUNTS.items():
        if os.path.isdir(target):
            _check(_libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                               options), f"mounting a private {target}")
    os.chdir(APP_ROOT)


def prepare_mountpoint() -> None:
    """/app on the host: an empty folder, only ever mounted over inside instances."""
    Path(APP_ROOT).mkdir(mode=0o755, exist_ok=True)


def child_setup(lower: Path, upper: Path, work: Path,
                then: Callable[[], None] | None) -> Callable[[], None]:
    """A preexec step: mount /app and the rest, files private by default (umask 077),
    then `then` (become the app's user)."""
    def setup() -> None:
        enter(lower, upper, work)
        os.umask(0o077)
        if then is not None:
            then()

    return setup


def environment(venv_bin: str = f"{APP_ROOT}/.venv/bin") -> dict[str, str]:
    """What every process of a slug gets besides its config: Heroku's names."""
    return {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": APP_ROOT,
            "VIRTUAL_ENV": f"{APP_ROOT}/.venv", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
