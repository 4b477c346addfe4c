"""Unpacking what a tenant made, as root's daemons do it: slugs on host agents, bundles on
builders. Each archive here is hostile (made as an attacker would make it, including the
symlink chain that walks Python 3.11.7's `extractall(filter="data")` out of its target,
CVE-2025-4517); nothing may land outside the target folder, nothing outside may change,
and what is unpacked belongs to the tenant's uid with no set-id bit.

Integration tier: the unpacking runs in a real child process under another uid (root is
needed to switch to it; the session runs as root)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from agents import bundle, slug, unpacker
from agents.builder import extract_bundle

OWNER = (299_987, 299_987)
"""A uid and gid no user of this machine has (apps' range): what an app's files get."""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching uids needs root")


def _tar(entries: list[tuple[str, str, bytes | str]]) -> bytes:
    """A tar.gz of (name, kind, content-or-link-target) in order; every one a Procfile."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, value in [("Procfile", "file", b"web: true\n"), *entries]:
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if kind == "file":
                data = value if isinstance(value, bytes) else value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE,
                         "hard": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            info.mode = 0o777 if kind == "dir" else 0o6755 if kind == "sym" else 0o644
            info.linkname = str(value)
            tar.addfile(info)
    return buf.getvalue()


def _path_max_chain(target_len: int) -> list[tuple[str, str, bytes | str]]:
    """CVE-2025-4517: links whose expansion passes PATH_MAX, so os.path.realpath stops
    expanding and tarfile's filter believes `escape` stays inside; `escape` is the folder
    above the target, and `escape/newfile` is written there."""
    steps = "abcdefghijklmnop"
    comp = "d" * ((os.pathconf("/", "PC_PATH_MAX") - (target_len + 1)) // (len(steps) + 1))
    out: list[tuple[str, str, bytes | str]] = []
    path = ""
    for step in steps:
        out.append((os.path.join(path, comp), "dir", ""))
        out.append((os.path.join(path, step), "sym", comp))
        path = os.path.join(path, comp)
    link = os.path.join(*steps, "l" * 254)
    out.append((link, "sym", os.path.join(*[".."] * len(steps))))
    out.append(("escape", "sym", os.path.join(link, "..")))
    out.append(("escape/newfile", "file", b"pwned\n"))
    return out


def _attacks(outside: Path, secret: Path) -> dict[str, Callable[[int], list]]:
    """name -> entries, given the length of the target folder's path."""
    return {
        "path-max-symlink-chain": _path_max_chain,
        "symlink-then-file-through-it": lambda _: [
            ("evil", "sym", str(outside)), ("evil/pwned", "file", b"pwned\n")],
        "relative-symlink-then-file": lambda _: [
            ("up", "sym", "../../.."), ("up/pwned", "file", b"pwned\n")],
        "symlink-then-folder-through-it": lambda _: [
            ("evil", "sym", str(outside)), ("evil/made", "dir", "")],
        "hardlink-to-a-secret-then-overwrite": lambda _: [
            ("flag", "hard", str(secret)), ("flag", "file", b"overwritten\n")],
        "hardlink-to-shadow": lambda _: [("shadow", "hard", "/etc/shadow")],
        "dot-dot-escape": lambda _: [("../pwned", "file", b"pwned\n")],
        "dot-dot-inside-a-name": lambda _: [("a/../../pwned", "file", b"pwned\n")],
        "absolute-name": lambda _: [(str(outside / "pwned"), "file", b"pwned\n")],
        "a-device": lambda _: [("null", "chr", "")],
        "a-fifo": lambda _: [("pipe", "fifo", "")],
    }


ATTACKS = list(_attacks(Path("/x"), Path("/y")))


def _shadow() -> tuple[int, int, int]:
    """/etc/shadow's links, owner and mode (not its size or inode: other sessions on this
    machine add users meanwhile, and useradd writes it anew): a hard link to it shows."""
    st = os.stat("/etc/shadow")
    return st.st_nlink, st.st_uid, st.st_mode


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_mtime_ns, p.lstat().st_size) for p in root.rglob("*")}


@pytest.fixture()
def place(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(folder holding the target, a folder outside, a secret file outside)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = tmp_path / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    holder = tmp_path / "h"
    holder.mkdir()
    return holder, outside, secret


def _store(data: bytes, where: Path) -> tuple[Path, str]:
    digest = hashlib.sha256(data).hexdigest()
    path = where / f"{digest}.tar.gz"
    path.write_bytes(data)
    return path, digest


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_slug_writes_nothing_outside_its_folder(
        attack: str, place: tuple[Path, Path, Path], tmp_path: Path) -> None:
    holder, outside, secret = place
    into = holder / "releases"
    # the slug is unpacked into into/.unpack-XXXXXXXX (mkdtemp), then renamed
    entries = _attacks(outside, secret)[attack](len(str(into)) + len("/.unpack-") + 8)
    path, digest = _store(_tar(entries), tmp_path)
    before = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    with pytest.raises(slug.SlugRefused):
        slug.unpack(path, digest, into, OWNER)
    assert sorted(p.name for p in into.iterdir()) == [f".{digest}.lock"], (
        "a refused slug leaves nothing behind, in its folder or beside it")
    assert sorted(p.name for p in holder.iterdir()) == ["releases"]
    after = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    assert after == before


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_bundle_writes_nothing_outside_the_build_folder(
        attack: str, place: tuple[Path, Path, Path], tmp_path: Path) -> None:
    holder, outside, secret = place
    app = holder / "app"
    app.mkdir()
    entries = _attacks(outside, secret)[attack](len(str(app)))
    path, digest = _store(_tar(entries), tmp_path)
    before = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    with pytest.raises(bundle.BundleRefused):
        extract_bundle(path, digest, app, OWNER)
    assert sorted(p.name for p in holder.iterdir()) == ["app"]
    after = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    assert after == before


def test_a_slug_is_unpacked_by_its_owner_with_modes_set_by_us(tmp_path: Path) -> None:
    data = _tar([("bin", "dir", ""), ("bin/run", "file", b"#!/bin/sh\n"),
                 (".venv", "dir", ""), (".venv/python", "sym", "/usr/bin/python3"),
                 ("pkg", "dir", ""), ("pkg/mod.py", "file", b"x = 1\n")])
    # set-id bits and group/other write asked for by the archive are not given
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, \
            tarfile.open(fileobj=buf, mode="w:gz") as out:
        for m in src:
            if m.name == "bin/run":
                m.mode, m.uid, m.gid, m.mtime = 0o6777, 0, 0, 1_700_000_000
            out.addfile(m, src.extractfile(m) if m.isfile() else None)
    path, digest = _store(buf.getvalue(), tmp_path)
    final = slug.unpack(path, digest, tmp_path / "releases", OWNER)
    run = final / "bin" / "run"
    assert (run.stat().st_uid, run.stat().st_gid) == OWNER
    assert oct(run.stat().st_mode & 0o7777) == oct(0o755)
    assert run.stat().st_mtime == 1_700_000_000, "kept: compiled bytecode checks it"
    assert os.readlink(final / ".venv" / "python") == "/usr/bin/python3"
    assert os.lstat(final / ".venv" / "python").st_uid == OWNER[0]
    assert (final / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert final.stat().st_uid == OWNER[0]


def test_a_bundle_link_leading_out_is_refused_even_if_nothing_uses_it(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    path, digest = _store(_tar([("conf", "sym", "/etc/passwd")]), tmp_path)
    with pytest.raises(bundle.BundleRefused, match="outside"):
        extract_bundle(path, digest, app, OWNER)


@pytest.mark.parametrize("attack", ATTACKS)
def test_the_unpacker_alone_refuses_each_attack_without_the_guard_in_front(
        attack: str, place: tuple[Path, Path, Path], tmp_path: Path) -> None:
    holder, outside, secret = place
    entries = _attacks(outside, secret)[attack](len(str(holder / "inside")))
    path, _ = _store(_tar(entries), tmp_path)
    before = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    for links in ("inside", "any"):
        (holder / links).mkdir()
        with pytest.raises(unpacker.UnpackRefused):
            unpacker.unpack_as(path, holder / links, OWNER, links)
    assert sorted(p.name for p in holder.iterdir()) == ["any", "inside"]
    after = _snapshot(tmp_path / "outside"), secret.read_text(), _shadow()
    assert after == before


def test_a_slug_is_packed_by_the_build_uid_which_cannot_read_what_it_could_not(
        tmp_path: Path) -> None:
    """The builder (root) never reads a build's folder: a child as the build's uid packs
    it. A file there the build's uid may not read (root's, 0600: how a link or a race
    would show root something) makes packing fail rather than put it in the slug."""
    app = tmp_path / "app"
    (app / "pkg").mkdir(parents=True)
    (app / "pkg" / "mod.py").write_text("x = 1\n")
    (app / ".venv").mkdir()
    (app / ".venv" / "python").symlink_to("/usr/bin/python3")
    for path in [app, *app.rglob("*")]:
        os.lchown(path, *OWNER)
    digest, _ = slug.pack(app, tmp_path / "store", OWNER)
    with tarfile.open(tmp_path / "store" / f"{digest}.tar.gz") as tar:
        got = {m.name: m for m in tar.getmembers()}
    assert set(got) == {"pkg", "pkg/mod.py", ".venv", ".venv/python"}
    assert got["pkg/mod.py"].uid == 0 and got[".venv/python"].linkname == "/usr/bin/python3"
    secret = app / "stolen"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)  # root's: the build's uid cannot read it
    with pytest.raises(OSError, match="Permission denied"):
        slug.pack(app, tmp_path / "store2", OWNER)
    assert not list((tmp_path / "store2").glob("*.tar.gz"))
