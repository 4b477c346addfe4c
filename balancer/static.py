"""Static files served from the release's slug, by the balancer itself.

An app declares them in `static.json` beside its Procfile: `{"/static/": "static"}` maps URL
prefixes (ending in `/`) to folders of the app. The routes carry the slug of the newest
serving release; the balancer fetches it through the API (its token), checks its sha256 as
the agents do, and unpacks only the declared folders' regular files (no links, no `..`,
no absolute names, the platform's archive limits) under a folder of its own. A request
(GET or HEAD) whose path starts with a declared prefix is answered from there: the content
type from the name, an ETag naming the slug (content-addressed: a new slug, a new ETag),
304 to a matching If-None-Match; a path that leaves its folder, or a file that is not
there, goes to the app as any other request would.

Plain blocking code with no eventlet: the shell fetches and unpacks in a thread pool.
"""

from __future__ import annotations

import hashlib
import mimetypes
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ledger.archives import ArchiveRefused, guarded
from ledger.static import DECLARATION, StaticRefused, declaration

MAX_FILE = 64 << 20
"""Largest static file the balancer answers itself (bigger ones go to the app)."""


@dataclass(frozen=True)
class Site:
    """One slug's static files, unpacked: URL prefix -> folder."""

    digest: str
    folders: tuple[tuple[bytes, Path], ...]

    @property
    def etag(self) -> bytes:
        return b'"' + self.digest[:24].encode() + b'"'


def file_for(site: Site, target: bytes) -> Path | None:
    """The file of `site` a request target names, or None (not a static path, or a path
    that leaves its folder, or no such regular file)."""
    path = target.split(b"?", 1)[0]
    for prefix, folder in site.folders:
        if path.startswith(prefix):
            rest = unquote(path[len(prefix):].decode("latin-1"))
            if not rest or "\x00" in rest or "\\" in rest:
                return None
            parts = rest.split("/")
            if any(p in ("", ".", "..") for p in parts):
                return None
            candidate = folder.joinpath(*parts)
            try:
                real = candidate.resolve(strict=True)
            except (OSError, RuntimeError):
                return None
            if folder not in real.parents or not real.is_file():
                return None
            return real
    return None


def if_none_match(header_lines: list[bytes]) -> bytes | None:
    """The If-None-Match value of a request's header lines (CRLF-ended), if any."""
    for line in header_lines:
        if line[:14].lower() == b"if-none-match:":
            return line[14:].strip()
    return None


def content_type(path: Path) -> bytes:
    kind, encoding = mimetypes.guess_type(path.name)
    if kind is None or encoding is not None:
        return b"application/octet-stream"
    if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
        return kind.encode() + b"; charset=utf-8"
    return kind.encode()


def response(site: Site, path: Path, if_none_match: bytes | None, head: bool,
             close: bool) -> bytes | None:
    """The whole response for a static file (None: too big, let the app answer)."""
    size = path.stat().st_size
    if size > MAX_FILE:
        return None
    conn = b"close" if close else b"keep-alive"
    if if_none_match is not None and (if_none_match.strip() == b"*" or site.etag in [
            t.strip().removeprefix(b"W/") for t in if_none_match.split(b",")]):
        return (b"HTTP/1.1 304 Not Modified\r\nETag: %s\r\nConnection: %s\r\n\r\n"
                % (site.etag, conn))
    head_bytes = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nETag: %s\r\n"
                  b"Cache-Control: public, max-age=3600\r\nConnection: %s\r\n\r\n"
                  % (content_type(path), size, site.etag, conn))
    return head_bytes if head else head_bytes + path.read_bytes()


class StaticStore:
    """Slugs' static files unpacked under `root` (one folder per slug digest), fetched with
    `fetch(app, release, destination)`."""

    def __init__(self, root: Path, fetch: Callable[[str, int, Path], None]) -> None:
        self.root, self.fetch = root, fetch
        self.sites: dict[str, Site | None] = {}
        """digest -> its files (None: the slug declares none, or was refused)."""

    def prepare(self, app: str, release: int, digest: str) -> Site | None:
        """Fetch the slug, check it, unpack its declared folders (blocking: a thread's)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".fetch-") as tmp:
            archive = Path(tmp) / "slug.tar.gz"
            self.fetch(app, release, archive)
            if _sha256(archive) != digest:
                raise StaticRefused(f"the slug of {app} v{release} is not {digest[:12]}")
            staging = Path(tmp) / "site"
            folders = unpack_declared(archive, staging)
            if not folders:
                return None
            final = self.root / digest
            if not final.exists():
                staging.rename(final)
        return Site(digest, tuple((p.encode(), (final / f).resolve())
                                  for p, f in sorted(folders.items(), key=lambda kv: -len(
                                      kv[0]))))

    def forget_all_but(self, digests: set[str]) -> None:
        """Remove what no route names any more."""
        for digest in list(self.sites):
            if digest not in digests:
                del self.sites[digest]
                shutil.rmtree(self.root / digest, ignore_errors=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unpack_declared(archive: Path, into: Path) -> dict[str, str]:
    """Unpack the regular files of the folders `static.json` declares (none: {}), refusing
    the archive if it passes the platform's limits (ledger/archives.py)."""
    size = archive.stat().st_size
    with tarfile.open(archive, "r:gz") as tar:
        member = next((m for m in guarded(tar, size) if _name(m) == DECLARATION
                       and m.isfile()), None)
        if member is None:
            return {}
        raw = tar.extractfile(member)
        folders = declaration(raw.read(1 << 16) if raw else b"")
    wanted = set(folders.values())
    into.mkdir(mode=0o700)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in guarded(tar, size):
                name = _name(m)
                if not m.isfile() or not any(name.startswith(w + "/") for w in wanted):
                    continue  # links, devices, folders (made below), other files
                if name.startswith("/") or ".." in name.split("/"):
                    continue
                dest = into / name
                dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:
                    continue
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
    except ArchiveRefused as exc:
        raise StaticRefused(f"the slug: {exc}") from None
    return folders


def _name(m: tarfile.TarInfo) -> str:
    return posixpath.normpath(m.name.removeprefix("./")) if m.name not in (".", "./") else "."
