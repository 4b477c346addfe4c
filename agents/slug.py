"""Slugs: what a build made (the app's files plus its installed virtualenv at /app/.venv),
as a tar.gz named by its sha256, stored beside the bundles. Every host runs it as is, at
/app, with no pip and no network.

Packing (the builder, once the sandbox is gone, through a child running as the build's
uid: agents/unpacker.py): only folders, regular files and symbolic links, owned by root in
the archive, no set-id bits, no group or other write; nothing is opened through a link,
and root never reads the build's folder at all.

Unpacking (the host agent): the digest is checked, then the slug is unpacked once per host
under a lock (two instances of one release starting together wait for one unpack instead
of racing to rename), by agents/unpacker.py: as the app's uid, never by tarfile's own
extraction, refusing absolute or `..` names, hard links, devices and any entry written
through a link. Links may point anywhere: they are resolved inside the instance's own view
of the filesystem, with the app's own rights (the virtualenv's `python` is one, to /usr/bin).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import tarfile
import tempfile
from pathlib import Path

from agents import unpacker
from agents.bundle import BundleRefused, digest_of
from ledger.archives import ArchiveRefused, guarded


class SlugRefused(BundleRefused):
    """A slug that cannot be run here; the message says why."""


def pack(root: Path, store: Path, owner: tuple[int, int] | None = None) -> tuple[str, int]:
    """Archive the build folder into `store`/<sha256>.tar.gz; returns (digest, size). The
    folder is read by a child running as `owner` (the build's uid, agents/unpacker.py):
    the builder, root, never opens a file or a folder a build made."""
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".slug-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as raw:
            unpacker.pack_as(root, raw, owner)
        digest = digest_of(Path(tmp))
        final = store / f"{digest}.tar.gz"
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return digest, final.stat().st_size


def check(members: list[tarfile.TarInfo]) -> None:
    """Refuse entries that are not folders, files or links, or whose name leaves the slug."""
    for m in members:
        norm = posixpath.normpath(m.name.removeprefix("./"))
        if m.name.startswith("/") or norm == ".." or norm.startswith("../"):
            raise SlugRefused(f"slug entry {m.name!r} points outside the app folder")
        if not (m.isfile() or m.isdir() or m.issym()):
            raise SlugRefused(f"slug entry {m.name!r} is not a file, folder or symlink")


def unpack(slug: Path, digest: str, into: Path, owner: tuple[int, int] | None) -> Path:
    """`into`/<digest>: the slug unpacked once on this host by the app's user, who owns it
    (so an instance may change any file in its own overlay), its digest checked first."""
    final = into / digest
    if final.exists():
        return final
    into.mkdir(parents=True, exist_ok=True)
    with open(into / f".{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():  # another thread or agent unpacked it while we waited
            return final
        if not slug.exists():
            raise SlugRefused(f"slug {digest[:12]} not found at {slug}")
        if (actual := digest_of(slug)) != digest:
            raise SlugRefused(f"slug digest mismatch: expected {digest[:12]}, got "
                              f"{actual[:12]}")
        scratch = Path(tempfile.mkdtemp(dir=into, prefix=".unpack-"))
        try:
            try:
                with tarfile.open(slug, "r:gz") as tar:  # headers only: the guard
                    check(list(guarded(tar, slug.stat().st_size)))
                unpacker.unpack_as(slug, scratch, owner, links="any")
            except (ArchiveRefused, unpacker.UnpackRefused) as exc:
                raise SlugRefused(f"unsafe slug: {exc}") from exc
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise SlugRefused(f"the slug is not a valid tar.gz: {exc}") from exc
            os.rename(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return final


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.chown(root, uid, gid)

