"""Unpacking what a tenant made (a bundle, a slug) without tarfile's extraction.

Python 3.11.7's `extractall(filter="data")` is walked out of its target by a chain of
symlinks whose expansion passes PATH_MAX (CVE-2025-4517), and the daemons that unpack run
as root. So tarfile here only parses; every write is ours, made by a child process
running as the uid that will own the files (the app's, or its build's), relative to a
folder descriptor, one name at a time, never following a link:

- only folders, regular files and symbolic links: hard links, devices and fifos are refused;
- absolute names and `..` components are refused; an entry whose path passes through a
  link is refused (a link is only ever made as the last name of an entry, and nothing is
  written through one); an entry given twice is refused;
- `links="inside"` (bundles): a link's target must stay inside the folder, by its name;
  `links="any"` (slugs): a link may point anywhere (the virtualenv's python is a link to
  /usr/bin/python3), since it is followed later only by the app, with the app's rights;
- modes are ours: no set-id or sticky bit, no group or other write; a file keeps its
  mtime (compiled bytecode is checked against it).

Standard library only: this file's source is also the child's program (`python3 -I -S
-c`), which must not need to read anything of the platform's to run.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import IO, Any

CHILD_PYTHON = "/usr/bin/python3"
"""The system's interpreter runs the child: the app's uid may not reach tally's own
virtualenv. Any Python 3.8+ parses tar headers the same."""
LINK_POLICIES = ("inside", "any")
FILE_MODE, DIR_MODE = 0o755, 0o755
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackRefused(Exception):
    """The archive cannot be unpacked safely; the message names the entry and why."""


def _child(owner: tuple[int, int] | None, *args: str) -> tuple[list[str], dict[str, Any]]:
    """The argv and Popen keywords of a child running this module as `owner`."""
    switch: dict[str, Any] = {}
    if owner is not None:
        switch = {"user": owner[0], "group": owner[1], "extra_groups": []}
    python = CHILD_PYTHON if os.path.exists(CHILD_PYTHON) else sys.executable
    return ([python, "-I", "-S", "-c", Path(__file__).read_text(), *args],
            {"cwd": "/", "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, **switch})


def pack_as(root: Path, out: IO[bytes], owner: tuple[int, int] | None) -> None:
    """Write the tar.gz of the folder `root` to `out`, read by a child running as `owner`
    (the build's uid): the builder itself never reads a file a build made. Raises OSError
    saying why when the child fails."""
    fd = os.open(root, OPEN_DIR)
    try:
        argv, kw = _child(owner, "pack", str(fd))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, pass_fds=(fd,), **kw)
    finally:
        os.close(fd)
    assert proc.stdout is not None and proc.stderr is not None
    with proc:
        while chunk := proc.stdout.read(1 << 16):
            out.write(chunk)
        said = proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0:
        raise OSError(said[-1] if said else f"the packer exited with {proc.returncode}")


def unpack_as(archive: Path, into: Path, owner: tuple[int, int] | None, links: str,
              timeout: float = 600.0) -> None:
    """Unpack the tar.gz `archive` into the existing, empty folder `into`, as `owner`
    (uid, gid; None: as this process's user). `into` is given to `owner` first. Its
    guard (ledger.archives: size, entries, ratio) is the caller's to run before."""
    if links not in LINK_POLICIES:
        raise ValueError(f"links must be one of {LINK_POLICIES}")
    fd = os.open(into, OPEN_DIR)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        argv, kw = _child(owner, "unpack", str(fd), links)
        with open(archive, "rb") as src:
            proc = subprocess.run(argv, stdin=src, capture_output=True, pass_fds=(fd,),
                                  timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise UnpackRefused(f"unpacking took longer than {timeout:g} s") from exc
    finally:
        os.close(fd)
    if proc.returncode != 0:
        said = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise UnpackRefused(said[-1] if said else f"the unpacker exited with status "
                            f"{proc.returncode}")


# --- the child: everything below runs as the owner ---------------------------------------


def names(name: str) -> list[str]:
    """An entry's path as names below the folder; UnpackRefused if it could leave it."""
    if name.startswith("/"):
        raise UnpackRefused(f"entry {name[:200]!r} has an absolute name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnpackRefused(f"entry {name[:200]!r} has a '..' in its name")
    return parts


def link_stays_inside(parts: list[str], target: str) -> bool:
    """Does a link at `parts` pointing to `target` resolve inside the folder, by name?"""
    if target.startswith("/"):
        return False
    norm = posixpath.normpath(posixpath.join(*parts[:-1], target) if parts[:-1] else target)
    return norm != ".." and not norm.startswith("../")


def open_folder(root: int, parts: list[str], create: bool, name: str) -> int:
    """A descriptor of the folder `parts` below `root`, made if `create`; never through a
    link (O_NOFOLLOW on every name)."""
    fd = os.dup(root)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=fd)
            try:
                child = os.open(part, OPEN_DIR, dir_fd=fd)
            except OSError as exc:
                raise UnpackRefused(f"entry {name[:200]!r} goes through {part[:60]!r}, "
                                    "which is not a folder (a link?)") from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def extract(stream: IO[bytes], root: int, links: str) -> int:
    """Unpack the tar.gz on `stream` below the folder descriptor `root`; the entry count."""
    folders: list[tuple[list[str], int]] = []
    count = 0
    with tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in tar:
            count += 1
            parts = names(member.name)
            if not parts:
                continue  # the folder itself
            if member.isdir():
                os.close(open_folder(root, parts, True, member.name))
                folders.append((parts, member.mode))
            elif member.isfile():
                _file(tar, member, root, parts)
            elif member.issym():
                if links == "inside" and not link_stays_inside(parts, member.linkname):
                    raise UnpackRefused(f"link {member.name[:200]!r} -> "
                                        f"{member.linkname[:200]!r} leads outside the folder")
                parent = open_folder(root, parts[:-1], True, member.name)
                try:
                    os.symlink(member.linkname, parts[-1], dir_fd=parent)
                except FileExistsError:
                    raise UnpackRefused(f"entry {member.name[:200]!r} is given twice") from None
                finally:
                    os.close(parent)
            else:
                kind = "a hard link" if member.islnk() else "a device or fifo"
                raise UnpackRefused(f"entry {member.name[:200]!r} is {kind}: only files, "
                                    "folders and symlinks are allowed")
    for parts, mode in reversed(folders):  # last: a read-only folder would stop writes
        fd = open_folder(root, parts, False, "/".join(parts))
        try:
            os.fchmod(fd, (mode & DIR_MODE) | 0o700)
        finally:
            os.close(fd)
    return count


def _file(tar: tarfile.TarFile, member: tarfile.TarInfo, root: int, parts: list[str]) -> None:
    parent = open_folder(root, parts[:-1], True, member.name)
    try:
        try:
            fd = os.open(parts[-1], NEW_FILE, 0o600, dir_fd=parent)
        except FileExistsError:
            raise UnpackRefused(f"entry {member.name[:200]!r} is given twice") from None
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        src = tar.extractfile(member)
        if src is not None:
            while chunk := src.read(1 << 16):
                out.write(chunk)
        os.fchmod(out.fileno(), member.mode & FILE_MODE)
        out.flush()
        os.utime(out.fileno(), (member.mtime, member.mtime))


def pack(out: IO[bytes], root: int) -> None:
    """The tar.gz of the folder descriptor `root` on `out`: folders, regular files and
    symbolic links only (sockets, fifos and devices left out), owned by root in the
    archive, no set-id bits, no group or other write; nothing followed through a link."""
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=root):
            dirnames.sort()
            rel = dirpath.removeprefix(".").lstrip("/")
            for name in [*dirnames, *sorted(filenames)]:
                _add(tar, dirfd, name, f"{rel}/{name}" if rel else name)


def _add(tar: tarfile.TarFile, dirfd: int, name: str, rel: str) -> None:
    st = os.lstat(name, dir_fd=dirfd)
    info = tarfile.TarInfo(rel)
    info.mtime, info.uid, info.gid = int(st.st_mtime), 0, 0
    info.mode = stat.S_IMODE(st.st_mode) & FILE_MODE
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dirfd)
        tar.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dirfd)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return
            info.size = os.fstat(f.fileno()).st_size
            tar.addfile(info, f)


def main(argv: list[str]) -> int:
    if argv[1] == "pack":
        try:
            pack(sys.stdout.buffer, int(argv[2]))
        except OSError as exc:
            print(f"cannot pack the slug: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        extract(sys.stdin.buffer, int(argv[2]), argv[3])
    except UnpackRefused as exc:
        print(exc, file=sys.stderr)
        return 2
    except (tarfile.TarError, EOFError, OSError) as exc:
        print(f"the archive is not a valid tar.gz: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
