"""Bundles (and slugs) on a builder or a host: fetch one, check it.

The API checks bundles at upload, but a builder trusts nothing it did not check itself: the
digest must match, every entry must stay inside the app folder (no absolute paths, no
`..`, no links leading out, no devices), and a Procfile must sit at the top
(agents/builder.py extracts it so). Slugs have checks of their own (agents/slug.py).

Bundles and slugs come from the API (`GET /apps/<app>/releases/<n>/bundle` with the agent's host
token, which the API grants only for releases placed on that host) when the agent has a
token; otherwise from the platform's bundles folder ($TALLY_HOME/bundles, where the API
stores them), for a single machine.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path


class BundleRefused(Exception):
    """The bundle cannot be run here; the message says why."""


def digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
    return h.hexdigest()


def download(api: str, token: str, app: str, release: int, digest: str, into: Path,
             patience: float = 15.0, kind: str = "bundle") -> Path:
    """Fetch the release's bundle (or slug, `kind`) from the API into `into`/<digest>.tar.gz
    (once), checking its digest. A 403/404 is retried for `patience` seconds: the API learns
    of a placement from its views, a moment after the placer appended it."""
    final = into / f"{digest}.tar.gz"
    if final.exists():
        return final
    into.mkdir(parents=True, exist_ok=True)
    into.chmod(0o700)
    req = urllib.request.Request(f"{api.rstrip('/')}/apps/{app}/releases/{release}/{kind}",
                                 headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                data = r.read()
            break
        except urllib.error.HTTPError as exc:
            if exc.code not in (403, 404) or time.monotonic() > deadline:
                detail = exc.read(300).decode("utf-8", "replace")
                raise BundleRefused(f"the API refused the bundle ({exc.code}): {detail}") from exc
            time.sleep(0.2)
        except OSError as exc:
            raise BundleRefused(f"cannot download the bundle from {api}: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise BundleRefused(f"downloaded bundle does not match digest {digest[:12]}")
    part = into / f".{digest}.part"
    part.write_bytes(data)
    part.replace(final)
    return final


def check_members(members: list[tarfile.TarInfo]) -> None:
    """Refuse any entry that could write outside the release folder."""
    names = set()
    for m in members:
        norm = posixpath.normpath(m.name.removeprefix("./"))
        names.add(norm)
        if m.name.startswith("/") or norm == ".." or norm.startswith("../"):
            raise BundleRefused(f"entry {m.name!r} points outside the release folder")
        if not (m.isfile() or m.isdir() or m.issym()):
            raise BundleRefused(f"entry {m.name!r} is not a file, folder or symlink")
        if m.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(norm), m.linkname))
            if m.linkname.startswith("/") or target == ".." or target.startswith("../"):
                raise BundleRefused(f"link {m.name!r} -> {m.linkname!r} leads outside the "
                                    f"release folder")
    if "Procfile" not in names:
        raise BundleRefused("the bundle has no Procfile at its top level")


UNPACKING = ".unpack-"
"""Prefix of a release folder being unpacked (renamed to its digest when whole)."""


def make_writable(root: Path) -> None:
    """Let a non-root owner remove a read-only release. Root needs none of it (its rmtree
    ignores modes, and walks by descriptors), and must not do it: the tree may be the
    app's to change, and a chmod by name follows a link swapped in between check and use.
    So only a non-root agent does it, on descriptors opened without following links."""
    if os.geteuid() == 0 or not root.is_dir() or root.is_symlink():
        return
    for _, _, _, fd in os.fwalk(root, follow_symlinks=False):
        os.fchmod(fd, 0o755)
