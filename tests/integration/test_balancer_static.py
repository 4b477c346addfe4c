"""Static files from the slug (balancer/static.py): what a slug may unpack (declared folders'
regular files only), which request paths reach a file (none that leaves its folder), the
answers (content type, ETag, 304, HEAD); then through the platform: a balancer fetches the
release's slug through the API with its token, checks it and serves `/static/` from it,
while every other path still goes to the app."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.static import (
    Site,
    StaticRefused,
    declaration,
    file_for,
    if_none_match,
    response,
    unpack_declared,
)
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster
from ledger.tls import new_seal_key
from tests.backends import Upstream
from tests.conftest import destroy_cluster, free_ports, make_cluster
from tests.fixtures.apps.fleet import ApiProc, Daemon
from tests.integration.test_balancer_api import https_platform, seed
from tests.waiting import wait_until

CSS = b"body { color: #333 }\n"


def slug(folder: Path, extra: list[tarfile.TarInfo] = ()) -> Path:  # type: ignore[assignment]
    """A slug as the builder packs one (names relative to the app), with a static folder,
    a secret beside it, and whatever hostile entries `extra` adds."""
    files = {"Procfile": b"web: gunicorn app:app\n", "static.json": b'{"/static/": "static"}',
             "static/app.css": CSS, "static/js/app.js": b"console.log(1)\n",
             "secret.txt": b"not for the web\n"}
    path = folder / "slug.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def test_only_declared_regular_files_are_unpacked(tmp_path: Path) -> None:
    archive = slug(tmp_path, [entry("static/passwd", tarfile.SYMTYPE, "/etc/passwd"),
                              entry("static/../../evil.txt"),
                              entry("static/hard", tarfile.LNKTYPE, "secret.txt")])
    folders = unpack_declared(archive, tmp_path / "site")
    assert folders == {"/static/": "static"}
    unpacked = sorted(str(p.relative_to(tmp_path / "site"))
                      for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert unpacked == ["static/app.css", "static/js/app.js"]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "site/static/passwd").exists()
    for bad in (b'{"/static/": "../.."}', b'{"static": "static"}', b"[]", b"{"):
        with pytest.raises(StaticRefused):
            declaration(bad)


def test_paths_that_leave_their_folder_reach_no_file(tmp_path: Path) -> None:
    unpack_declared(slug(tmp_path), tmp_path / "site")
    (tmp_path / "site" / "static" / "out").symlink_to(tmp_path / "site" / "secret.txt")
    site = Site("ab" * 32, ((b"/static/", (tmp_path / "site" / "static").resolve()),))
    assert file_for(site, b"/static/app.css?v=3") == tmp_path / "site/static/app.css"
    assert file_for(site, b"/static/js/app.js") is not None
    for target in (b"/static/../secret.txt", b"/static/%2e%2e/secret.txt", b"/static/js/../../x",
                   b"/static/", b"/static//etc/passwd", b"/static/%2Fetc%2Fpasswd",
                   b"/static/out", b"/static/nope.css", b"/static/js", b"/other/app.css",
                   b"/static/app.css%00.js", b"/static/..%5csecret.txt"):
        assert file_for(site, target) is None, target
    css = file_for(site, b"/static/app.css")
    assert css is not None
    reply = response(site, css, None, head=False, close=False)
    assert reply is not None and reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: text/css; charset=utf-8\r\n" in reply and reply.endswith(CSS)
    assert b'ETag: "' + b"ab" * 12 + b'"\r\n' in reply
    head = response(site, css, None, head=True, close=True)
    assert head is not None and head.endswith(b"Connection: close\r\n\r\n")
    etag = if_none_match([b"Accept: */*\r\n", b'If-None-Match: W/"' + b"ab" * 12 + b'"\r\n'])
    assert response(site, css, etag, head=False, close=False).startswith(  # type: ignore[union-attr]
        b"HTTP/1.1 304 Not Modified\r\n")


@pytest.fixture
def private() -> Iterator[Cluster]:
    c = make_cluster()
    yield c
    destroy_cluster(c)


def get(port: int, host: str, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_the_balancer_serves_static_files_from_the_release_slug(
        private: Cluster, tmp_path: Path) -> None:
    backend = Upstream("a")
    plain, tls_port = free_ports(2)
    api = ApiProc(private, "api-static", TALLY_SEAL_KEY=new_seal_key())
    daemons: list[Daemon] = [api]
    host = "site.tally.local"
    archive = slug(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    store = private.root.parent / "bundles"
    store.mkdir(exist_ok=True)
    (store / f"{digest}.tar.gz").write_bytes(archive.read_bytes())
    try:
        with Ledger(private.dsn()) as ledger:
            seed(ledger, "site", backend)  # ReleaseCreated is the app stream's version 2
            ledger.append("build-site.2", [NewEvent("BuildSucceeded", {
                "app": "site", "release": 1, "slug_digest": digest,
                "size_bytes": archive.stat().st_size, "seconds": 1.0})])
        api.start()
        daemons += https_platform(private, api, plain, tls_port, api.env["TALLY_SEAL_KEY"])

        def served() -> tuple[int, dict[str, str], bytes] | None:
            try:
                answer = get(plain, host, "/static/app.css")
            except OSError:  # not listening yet
                return None
            return answer if answer[0] == 200 and answer[2] == CSS else None
        status, headers, _ = wait_until(served, 60, "the slug's static files were never served")
        before = len(backend.requests)  # (until the slug was ready, the app answered)
        assert headers["content-type"] == "text/css; charset=utf-8"
        assert headers["etag"] == f'"{digest[:24]}"'
        assert get(plain, host, "/static/app.css", {"If-None-Match": headers["etag"]})[0] == 304
        # Everything else is the app's: paths out of the folder, files not in it, others.
        for path in ("/static/../secret.txt", "/static/nope.css", "/", "/secret.txt"):
            code, _, body = get(plain, host, path)
            assert code == 200 and json.loads(body)["backend"] == "a", path
        assert [r["path"] for r in backend.requests[before:]] == [
            "/static/../secret.txt", "/static/nope.css", "/", "/secret.txt"]
    finally:
        for d in daemons:
            d.kill()
        backend.close()
