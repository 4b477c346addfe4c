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
(gone with the start), /dev/shm and /run/lock small tmpfs mounts. The host's are
shared by every uid: another tenant could read a temporary file written without a mode,
or take a predictable path first (Django's documented /var/tmp/django_cache holds
pickles). Files are made with umask 077 besides.

Nothing an app writes reaches the host's disk: the layer (the overlay's upper and work
folders, /tmp, /var/tmp) is a tmpfs of the instance's formation size's `disk_mb`, mounted
in its namespace only (the folder on the host stays empty), as Heroku's dynos have an
ephemeral filesystem of their own. Writing past it fails with ENOSPC, in the app alone: no
tenant can fill the disk the ledger, the agents' state or other apps use. tmpfs pages are
charged to the memory cgroup of the process that wrote them, so an instance's files count
against its memory limit too (a size's `disk_mb` is half its `memory_mb`: an app at its
disk limit still has half its memory), and they are gone, memory with them, when its last
process exits (the namespace and its mounts go with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ledger.sizes import Size, size_of

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


@dataclass(frozen=True)
class Layer:
    """Where one start of an instance (or run) writes: a tmpfs of `size_mb` mounted at
    `folder` in its own namespace, holding the overlay's upper folder (the app's: /app's
    top), its work folder and the private /tmp and /var/tmp."""

    folder: Path
    uid: int
    gid: int
    size_mb: int

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    @property
    def work(self) -> Path:
        return self.folder / "work"

    @property
    def tmpfs_options(self) -> bytes:
        """A size in pages and a count of files (each file costs memory too, whatever its
        size): 256 a MiB."""
        return f"size={self.size_mb}m,nr_inodes={self.size_mb * 256},mode=0700".encode()


def fresh_layer(folder: Path, uid: int, gid: int, size_mb: int) -> Layer:
    """The mount point of one start of an instance (the last start's writes are dropped);
    the upper folder exists on the host too, empty, as the process's first working
    folder."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    folder.chmod(0o700)
    (folder / "upper").mkdir(mode=0o700)
    return Layer(folder, uid, gid, size_mb)


def _fill_layer(layer: Layer) -> None:
    """In the child: the layer's tmpfs and its folders (root's but the upper one)."""
    _check(_libc.mount(b"tmpfs", str(layer.folder).encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                       layer.tmpfs_options), f"mounting a {layer.size_mb} MiB tmpfs layer")
    layer.work.mkdir(mode=0o700)
    layer.upper.mkdir(mode=0o755)
    os.chown(layer.upper, layer.uid, layer.gid)
    for name in TEMP_FOLDERS:
        (layer.folder / name).mkdir()
        (layer.folder / name).chmod(0o1777)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MountFailed(err, f"{what}: {os.strerror(err)}")


def enter(lower: Path, layer: Layer) -> None:
    """In the child (root): a private mount namespace with the layer's tmpfs, the overlay
    at /app, a /proc that shows the app only its own processes, and temporary folders of
    its own."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    _fill_layer(layer)
    options = f"lowerdir={lower},upperdir={layer.upper},workdir={layer.work}".encode()
    _check(_libc.mount(b"overlay", APP_ROOT.encode(), b"overlay", 0, options),
           f"mounting the overlay at {APP_ROOT}")
    _check(_libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       b"hidepid=2"), "mounting a private /proc (hidepid=2)")
    # Opened first: the layer may itself be under /tmp, which the first mount covers.
    sources = {target: os.open(layer.folder / name, os.O_PATH | os.O_DIRECTORY)
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


def child_setup(lower: Path, layer: Layer,
                then: Callable[[], None] | None) -> Callable[[], None]:
    """A preexec step: mount /app and the rest, files private by default (umask 077),
    then `then` (become the app's user)."""
    def setup() -> None:
        enter(lower, layer)
        os.umask(0o077)
        if then is not None:
            then()

    return setup


def environment(venv_bin: str = f"{APP_ROOT}/.venv/bin") -> dict[str, str]:
    """What every process of a slug gets besides its config: Heroku's names."""
    return {"PATH": f"{venv_bin}:/usr/local/bin:/usr/bin:/bin", "HOME": APP_ROOT,
            "VIRTUAL_ENV": f"{APP_ROOT}/.venv", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}


def r18(size: Size, used_mb: int) -> str:
    """The instance's log line when its layer is full (tally's code; Heroku has none)."""
    return (f"Error R18 (Disk quota exceeded): /app, /tmp and /var/tmp hold {used_mb} MiB, "
            f"all of this instance's {size.disk_mb} MiB ({size.name}); writes fail with "
            "ENOSPC until it removes files or restarts")


class DiskWatch:
    """Says once, each time it happens, that an instance filled its layer (read through
    its first process's root: the layer is mounted in its namespace only)."""

    FULL = 0.98

    def __init__(self) -> None:
        self.told: set[str] = set()

    def check(self, instance_id: str, pid: int, size: str) -> str | None:
        try:
            st = os.statvfs(f"/proc/{pid}/root/tmp")
        except OSError:
            return None
        total = st.f_blocks * st.f_frsize
        used = total - st.f_bfree * st.f_frsize
        if total <= 0 or used < total * self.FULL:
            self.told.discard(instance_id)
            return None
        if instance_id in self.told:
            return None
        self.told.add(instance_id)
        return r18(size_of(size), used // 2**20)

    def keep_only(self, instance_ids: set[str]) -> None:
        self.told &= instance_ids
