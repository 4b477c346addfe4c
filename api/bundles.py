"""App bundles: a tar.gz of an app folder with a Procfile and what to install, stored
content-addressed as <bundles_dir>/<sha256>.tar.gz where agents download it.

Checked at upload so a bad bundle is refused with its reason, not found broken on a host:
size limit, digest, gzip/tar validity, a bounded number of entries and unpacked size, no
absolute or `..` paths, no links leading out of the folder (followed through each other, as
unpacking follows them), no entry written through a link, no devices or fifos, a Procfile
that parses, and a static files declaration (static.json) that parses if there is one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import tarfile
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

from api.errors import TooLarge, Unprocessable
from ledger.archives import MAX_UNPACKED_BYTES, ArchiveRefused, guarded
from ledger.static import DECLARATION, StaticRefused, declaration

PROCFILE_LINE = re.compile(r"^([a-z][a-z0-9_]{0,29}):\s*(\S.*)$")
CHUNK = 1 << 16
MAX_LINK_HOPS = 40
STATIC_MAX = 64 * 1024
"""The largest static.json (the balancers read no more of it)."""
INSTALLERS = {"requirements.txt", "pyproject.toml", "setup.py", "uv.lock", "poetry.lock"}
"""What the build installs from (agents/buildpack.py); a bundle needs one of them."""


def receive(stream: IO[bytes], into: Path, limit: int, what: str = "bundle",
            quota: str = "bundle_mb") -> tuple[Path, str]:
    """Copy an upload (a bundle, or a builder's slug) to a temporary file in `into`,
    refusing it past `limit` bytes (the `quota`). Returns (path, sha256 hex)."""
    into.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(dir=into, suffix=".upload")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"{what} larger than the limit of {limit} bytes (the "
                                   f"{quota} quota)", quota=quota)
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(name)
        raise
    if size == 0:
        os.unlink(name)
        raise Unprocessable(f"empty upload: send the {what} (a tar.gz) as the request body",
                            {"body": ["empty"]})
    return Path(name), digest.hexdigest()


def inspect(path: Path, max_unpacked: int = MAX_UNPACKED_BYTES) -> dict[str, str]:
    """Check the tarball is safe to unpack (within `max_unpacked` bytes: the app's quota)
    and return its Procfile as {type: command}."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            try:
                members = list(guarded(tar, path.stat().st_size, max_unpacked))
            except ArchiveRefused as exc:
                raise _unsafe(str(exc)) from exc
            _check_members(members)
            names = {_normal(m.name): m for m in members}
            if "Procfile" not in names or not names["Procfile"].isfile():
                raise Unprocessable("the bundle has no Procfile at its top level",
                                    {"bundle": ["missing Procfile"]})
            if not INSTALLERS & {n for n, m in names.items() if m.isfile()}:
                raise Unprocessable(
                    "the bundle says nothing to install: add requirements.txt (it may be "
                    "empty), pyproject.toml, setup.py, uv.lock or poetry.lock",
                    {"bundle": ["missing requirements.txt"]})
            extracted = tar.extractfile(names["Procfile"])
            text = extracted.read(65536).decode("utf-8", "replace") if extracted else ""
            _check_static(tar, names.get(DECLARATION))
    except StaticRefused as exc:
        raise Unprocessable(str(exc), {DECLARATION: [str(exc)]}) from None
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise Unprocessable(f"the bundle is not a valid tar.gz: {exc}",
                            {"bundle": ["not a tar.gz"]}) from exc
    return parse_procfile(text)


def _check_static(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> None:
    """The static files declaration, if the bundle has one: a regular file that parses
    (the balancers serve the folders it names); StaticRefused says what is wrong."""
    if member is None:
        return
    if not member.isfile():
        raise StaticRefused(f"{DECLARATION} must be a regular file")
    if member.size > STATIC_MAX:
        raise StaticRefused(f"{DECLARATION} is over {STATIC_MAX // 1024} KiB")
    extracted = tar.extractfile(member)
    declaration(extracted.read(STATIC_MAX) if extracted else b"")


def _normal(name: str) -> str:
    return posixpath.normpath(name.removeprefix("./"))


def _check_members(members: Iterable[tarfile.TarInfo]) -> None:
    members = list(members)
    links = {_normal(m.name): m.linkname for m in members if m.issym()}
    for m in members:
        name = m.name
        norm = _normal(name)
        if name.startswith("/") or norm == ".." or norm.startswith("../"):
            raise _unsafe(f"entry {name!r} points outside the app folder")
        if m.isdev() or m.isfifo():
            raise _unsafe(f"entry {name!r} is a device or fifo")
        parts = norm.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise _unsafe(f"entry {name!r} is written through the link "
                              f"{'/'.join(parts[:i])!r}")
        if m.issym() or m.islnk():
            base = parts[:-1] if m.issym() else []
            if _resolve(base, m.linkname, links, 0) is None:
                raise _unsafe(f"link {name!r} -> {m.linkname!r} leads outside the app folder "
                              "(or round in circles)")


def _resolve(start: list[str], target: str, links: dict[str, str],
             hops: int) -> list[str] | None:
    """Where `target`, relative to the folder `start`, lands once every link on the way
    is followed as the unpacking would: its path parts, or None if it leaves the app
    folder (or loops)."""
    if hops > MAX_LINK_HOPS or target.startswith("/"):
        return None
    parts = list(start)
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        here = "/".join([*parts, part])
        if here in links:
            resolved = _resolve(parts, links[here], links, hops + 1)
            if resolved is None:
                return None
            parts = resolved
        else:
            parts.append(part)
    return parts


def _unsafe(message: str) -> Unprocessable:
    return Unprocessable(f"unsafe bundle: {message}", {"bundle": [message]})


def parse_procfile(text: str) -> dict[str, str]:
    """`web: gunicorn app:app` lines -> {"web": "gunicorn app:app"}; comments and blank
    lines are skipped; anything else is refused with its line number."""
    procs: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PROCFILE_LINE.match(line)
        if not match:
            raise Unprocessable(f"Procfile line {n} is not `type: command`: {line[:80]!r}",
                                {"Procfile": [f"line {n}: expected `type: command`"]})
        procs[match.group(1)] = match.group(2)[:2000]
    if not procs:
        raise Unprocessable("the Procfile declares no process type",
                            {"Procfile": ["empty"]})
    return procs


def store(upload: Path, digest: str, bundles_dir: Path) -> Path:
    """Move a checked upload to its content address (an identical bundle is kept once)."""
    final = bundles_dir / f"{digest}.tar.gz"
    os.replace(upload, final)
    return final


def path_of(bundles_dir: Path, digest: str) -> Path:
    return bundles_dir / f"{digest}.tar.gz"


PRUNE_GRACE_S = 600.0
"""A bundle file younger than this is kept: another app may have just uploaded the same
content, its release not yet in the views."""


def unneeded(digests: Iterable[str], needed: set[str], ages: Mapping[str, float],
             grace: float = PRUNE_GRACE_S) -> list[str]:
    """Which of a deleted app's bundles (`digests`) to remove from the store: those no live
    app's release needs, older than `grace` seconds (`ages`; a missing file: nothing)."""
    return sorted(d for d in set(digests) - needed if ages.get(d, 0.0) > grace)


def prune(bundles_dir: Path, digests: Iterable[str], needed: set[str]) -> list[str]:
    """Remove the bundles `unneeded` says; returns their digests. Only bundles of releases
    are ever named here: slugs stored beside them are the builder's to prune."""
    now = time.time()
    ages = {}
    for d in set(digests):
        with contextlib.suppress(OSError):
            ages[d] = now - path_of(bundles_dir, d).stat().st_mtime
    gone = unneeded(digests, needed, ages)
    for d in gone:
        path_of(bundles_dir, d).unlink(missing_ok=True)
    return gone
