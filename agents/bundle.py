"""Releases on a host: fetch an app bundle, check it, unpack it read-only.

The API checks bundles at upload, but an agent trusts nothing it did not check itself: the
digest must match, every entry must stay inside the release folder (no absolute paths, no
`..`, no links leading out, no devices), and a Procfile must sit at the top. A refused
bundle leaves nothing behind: it is unpacked into a scratch folder beside its final place
and renamed only once complete.

Bundles come from the API (`GET /apps/<app>/releases/<n>/bundle` with the agent's host
token, which the API grants only for releases placed on that host) when the agent has a
token; otherwise from the platform's bundles folder ($TALLY_HOME/bundles, where the API
stores them), for a single machine.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ledger.archives import ArchiveRefused, guarded


class BundleRefused(Exception):
    """The bundle cannot be run here; the message says why."""


def digest_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            h.update(chunk)
    return h.hexdigest()


def download(api: str, token: str, app: str, release: int, digest: str, into: Path,
             patience: float = 15.0) -> Path:
    """Fetch the release's bundle from the API into `into`/<digest>.tar.gz (once), checking
    its digest. A 403/404 is retried for `patience` seconds: the API learns of a placement
    from its views, a moment after the placer appended it."""
    final = into / f"{digest}.tar.gz"
    if final.exists():
        return final
    into.mkdir(parents=True, exist_ok=True)
    into.chmod(0o700)
    req = urllib.request.Request(f"{api.rstrip('/')}/apps/{app}/releases/{release}/bundle",
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


def unpack(bundle: Path, digest: str, into: Path) -> Path:
    """The release folder `into`/<digest>, unpacked once and read-only; raises BundleRefused."""
    final = into / digest
    if final.exists():
        return final
    if not bundle.exists():
        raise BundleRefused(f"bundle {digest[:12]} not found at {bundle}")
    actual = digest_of(bundle)
    if actual != digest:
        raise BundleRefused(f"bundle digest mismatch: expected {digest[:12]}, got {actual[:12]}")
    into.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=into, prefix=UNPACKING))
    try:
        try:
            with tarfile.open(bundle, "r:gz") as tar:
                check_members(list(guarded(tar, bundle.stat().st_size)))
                tar.extractall(scratch, filter="data")
        except ArchiveRefused as exc:
            raise BundleRefused(f"unsafe bundle: {exc}") from exc
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleRefused(f"the bundle is not a valid tar.gz: {exc}") from exc
        read_only(scratch)
        os.rename(scratch, final)
    except BaseException:
        make_writable(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return final


def read_only(root: Path) -> None:
    """Files r--r--r-- (x kept where set), folders r-xr-xr-x: an app cannot change its code."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                mode = p.stat().st_mode
                p.chmod(0o555 if mode & stat.S_IXUSR else 0o444)
        for name in dirnames:
            d = Path(dirpath) / name
            if not d.is_symlink():
                d.chmod(0o555)
    root.chmod(0o555)


def make_writable(root: Path) -> None:
    if not root.exists():
        return
    root.chmod(0o755)
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            d = Path(dirpath) / name
            if not d.is_symlink():
                d.chmod(0o755)
