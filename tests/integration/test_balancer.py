"""The balancer over real sockets, in standalone mode (`tally serve balancer --routes FILE`),
in front of real backends (tests/backends.py): keep-alive, chunked both ways, a 100 MB
upload with bounded memory, WebSocket passthrough, retries, error pages, route changes
under load and a drain on SIGTERM, with zero failed requests where the issue says so."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends import Upstream
from tests.certs import tls_get
from tests.conftest import free_ports
from tests.waiting import wait_until


class Balancer:
    """A `tally serve balancer --routes FILE` subprocess and its routes file."""

    def __init__(self, *args: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tally-balancer-"))
        self.routes_file = self.dir / "routes.json"
        self.port, self.admin = free_ports(2)
        self.version = 0
        self.conns: list[http.client.HTTPConnection] = []
        self.set_routes([])
        self.log = open(self.dir / "balancer.log", "ab")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tally.cli", "serve", "balancer", "--bind",
             f"127.0.0.1:{self.port}", "--routes", str(self.routes_file), "--admin",
             f"127.0.0.1:{self.admin}", *args],
            stdout=self.log, stderr=self.log, env={**os.environ, "TALLY_HOME": str(self.dir)})
        wait_until(self.healthy, 30, "the balancer never answered /healthz")

    def healthy(self) -> str | None:
        try:
            with socket.create_connection(("127.0.0.1", self.admin), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            return data.decode()
        except OSError:
            return None

    def set_routes(self, routes: list[dict], wait: bool = True) -> None:
        """Write the routes file atomically; wait until the balancer has read it."""
        tmp = self.routes_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"routes": routes}))
        os.replace(tmp, self.routes_file)
        self.version += 1
        if wait and hasattr(self, "proc"):
            wait_until(lambda: f"version {self.version}\n" in (self.healthy() or ""), 10,
                       f"routes version {self.version} never applied")

    def conn(self, timeout: float = 30) -> http.client.HTTPConnection:
        """A client connection, closed at the end of the test."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        self.conns.append(conn)
        return conn

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send raw bytes, read until the balancer closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out

    def peak_rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:")))

    def stop(self) -> None:
        for conn in self.conns:
            conn.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def route(host: str, *backends: Upstream | str, app: str | None = None,
          maintenance: bool = False) -> dict:
    return {"hostname": host, "app": app or host.split(".")[0].lstrip("*"),
            "backends": [b if isinstance(b, str) else b.address for b in backends],
            "maintenance": maintenance}


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    made = [Upstream("a"), Upstream("b")]
    yield made
    for u in made:
        u.close()


@pytest.fixture
def balancer() -> Iterator[Balancer]:
    b = Balancer("--hold", "1", "--backend-timeout", "2", "--cooldown", "0.5")
    yield b
    b.stop()


def get(conn: http.client.HTTPConnection, host: str, path: str = "/",
        headers: dict | None = None) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Host": host, **(headers or {})})
    reply = conn.getresponse()
    return reply.status, reply.read()


def test_keep_alive_both_sides_and_forwarded_headers(balancer: Balancer,
                                                     upstreams: list[Upstream]) -> None:
    a = upstreams[0]
    balancer.set_routes([route("blog.localhost", a)])
    conn = balancer.conn()
    seen = []
    for _ in range(30):
        status, body = get(conn, "blog.localhost:8080", headers={
            "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Hop", "X-Hop": "secret"})
        assert status == 200
        seen.append(json.loads(body))
    assert a.connections == 1, "the balancer should reuse one backend connection"
    headers = seen[-1]["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "blog.localhost:8080"
    assert headers["via"] == "1.1 tally"
    assert "x-hop" not in headers and "connection" not in headers
    assert conn.sock is not None  # the client connection was kept too
    conn.close()


def test_round_robin_over_two_backends(balancer: Balancer, upstreams: list[Upstream]) -> None:
    balancer.set_routes([route("blog.localhost", *upstreams)])
    conn = balancer.conn()
    names = [json.loads(get(conn, "blog.localhost")[1])["backend"] for _ in range(10)]
    assert names.count("a") == 5 and names.count("b") == 5


def test_chunked_both_ways_and_head(balancer: Balancer, upstreams: list[Upstream]) -> None:
    balancer.set_routes([route("blog.localhost", upstreams[0])])
    conn = balancer.conn()
    parts = [os.urandom(1000 + i) for i in range(50)]
    conn.request("POST", "/upload", body=iter(parts), encode_chunked=True,
                 headers={"Host": "blog.localhost", "Transfer-Encoding": "chunked"})
    reply = json.loads(conn.getresponse().read())
    whole = b"".join(parts)
    assert reply == {"bytes": len(whole), "sha256": hashlib.sha256(whole).hexdigest(),
                     "backend": "a"}
    status, body = get(conn, "blog.localhost", "/split")
    assert status == 200 and json.loads(body)["path"] == "/split"
    status, body = get(conn, "blog.localhost", "/chunked?n=40")
    assert status == 200 and body == b"".join(f"a-{i};".encode() for i in range(40))
    conn.request("HEAD", "/", headers={"Host": "blog.localhost"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read() == b""
    assert int(reply.getheader("Content-Length")) > 0
    assert get(conn, "blog.localhost")[0] == 200  # the connection survived all that


def test_100_mb_upload_streams_with_bounded_memory(balancer: Balancer,
                                                   upstreams: list[Upstream]) -> None:
    balancer.set_routes([route("blog.localhost", upstreams[0])])
    before = balancer.peak_rss_kb()
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    for _ in range(100):
        digest.update(block)
    conn = balancer.conn(timeout=120)
    conn.request("POST", "/upload", body=iter([block] * 100),
                 headers={"Host": "blog.localhost", "Content-Length": str(100 << 20),
                          "Expect": "100-continue"})
    reply = json.loads(conn.getresponse().read())
    assert reply["bytes"] == 100 << 20 and reply["sha256"] == digest.hexdigest()
    grew_mb = (balancer.peak_rss_kb() - before) / 1024
    assert grew_mb < 24, f"the balancer's peak memory grew by {grew_mb:.0f} MB"


def test_websocket_upgrade_echo(balancer: Balancer, upstreams: list[Upstream]) -> None:
    balancer.set_routes([route("blog.localhost", upstreams[0])])
    with socket.create_connection(("127.0.0.1", balancer.port), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: blog.localhost\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Upgrade: websocket" in head
        frame = b"\x81\x85" + b"\x01\x02\x03\x04" + bytes(
            c ^ k for c, k in zip(b"hello", b"\x01\x02\x03\x04\x01", strict=True))
        for _ in range(3):
            s.sendall(frame)
            echoed = b""
            while len(echoed) < len(frame):
                echoed += s.recv(4096)
            assert echoed == frame


def test_retry_on_a_dead_backend(balancer: Balancer, upstreams: list[Upstream]) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    balancer.set_routes([route("blog.localhost", dead, upstreams[0])])
    for _ in range(10):
        conn = balancer.conn()  # new client connections: every pick of the dead one retries
        status, body = get(conn, "blog.localhost")
        assert status == 200 and json.loads(body)["backend"] == "a"
        conn.close()


def test_a_pooled_connection_the_backend_closed_is_retried_at_once(
        balancer: Balancer, upstreams: list[Upstream]) -> None:
    balancer.set_routes([route("blog.localhost", upstreams[0])])  # its only backend
    conn = balancer.conn()
    for _ in range(5):
        assert get(conn, "blog.localhost", "/then-close")[0] == 200
        status, body = get(conn, "blog.localhost")  # the pooled connection is closed now
        assert status == 200, body
    assert 'tally_router_held_total{app="blog"} 0' in metrics(balancer)


def test_error_pages(balancer: Balancer, upstreams: list[Upstream]) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    balancer.set_routes([
        route("blog.localhost", upstreams[0]),
        route("down.localhost", upstreams[0], maintenance=True),
        route("empty.localhost"),
        route("dead.localhost", dead),
    ])
    conn = balancer.conn()
    status, body = get(conn, "nope.localhost")
    assert status == 404 and b"No app answers to this hostname" in body
    status, body = get(conn, "down.localhost")
    assert status == 503 and b"maintenance" in body
    status, body = get(conn, "empty.localhost")  # held --hold 1 s, then 503
    assert status == 503 and b"no healthy instance" in body
    status, body = get(conn, "dead.localhost")
    assert status == 502
    status, body = get(conn, "blog.localhost", "/garbage")
    assert status == 502 and b"did not answer properly" in body
    conn = balancer.conn()
    status, body = get(conn, "blog.localhost", "/slow?s=4")  # --backend-timeout 2
    assert status == 504 and b"took too long" in body
    assert not upstreams[1].requests


@pytest.mark.parametrize("raw,status", [
    (b"POST / HTTP/1.1\r\nHost: blog.localhost\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: blog.localhost"
     b"\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: blog.localhost\r\nX-A: b\r\n c\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: blog.localhost\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: blog.localhost\r\n" + b"X-Big: " + b"b" * 70000 + b"\r\n\r\n",
     431),
    (b"POST / HTTP/1.1\r\nHost: blog.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nhello\r\n0\r\n\r\n", 400),
])
def test_bad_requests_never_reach_the_backend(balancer: Balancer, upstreams: list[Upstream],
                                              raw: bytes, status: int) -> None:
    balancer.set_routes([route("blog.localhost", upstreams[0])])
    reply = balancer.raw(raw)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:100]
    assert b"Connection: close" in reply and reply.count(b"HTTP/1.1") == 1
    assert not upstreams[0].requests


def test_body_over_the_limit_is_413() -> None:
    b = Balancer("--max-body-mb", "1")
    try:
        reply = b.raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 413 ")
    finally:
        b.stop()


def test_hold_until_a_backend_appears(balancer: Balancer, upstreams: list[Upstream]) -> None:
    b = Balancer("--hold", "20")
    try:
        b.set_routes([route("blog.localhost")])
        result: list = []
        t = threading.Thread(target=lambda: result.append(get(b.conn(), "blog.localhost")))
        t.start()
        wait_until(lambda: "tally_router_held_total{app=\"blog\"} 1" in metrics(b), 10,
                   "the request was never held")
        b.set_routes([route("blog.localhost", upstreams[1])])
        t.join(20)
        assert result and result[0][0] == 200 and json.loads(result[0][1])["backend"] == "b"
    finally:
        b.stop()


def metrics(b: Balancer) -> str:
    with socket.create_connection(("127.0.0.1", b.admin), timeout=2) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def load(b: Balancer, host: str, stop: threading.Event, path: str = "/",
         threads: int = 8) -> tuple[list, list, list[threading.Thread]]:
    """Clients on kept-alive connections until `stop`: (answers, failures, threads)."""
    answers: list = []
    failures: list = []

    def client() -> None:
        conn = b.conn()
        while not stop.is_set():
            try:
                status, body = get(conn, host, path)
                (answers if status == 200 else failures).append((status, body))
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                conn.close()
                conn = b.conn()

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    return answers, failures, workers


def test_route_changes_under_load_fail_nothing(balancer: Balancer,
                                               upstreams: list[Upstream]) -> None:
    a, b = upstreams
    balancer.set_routes([route("blog.localhost", a)])
    stop = threading.Event()
    answers, failures, workers = load(balancer, "blog.localhost", stop)
    try:
        for i in range(12):
            chosen = [a] if i % 3 == 0 else [b] if i % 3 == 1 else [a, b]
            balancer.set_routes([route("blog.localhost", *chosen),
                                 route(f"other{i}.localhost", a)])
            n = len(answers)
            wait_until(lambda n=n: len(answers) > n + 20, 20, "no progress under load")
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    assert not failures, failures[:5]
    assert {json.loads(body)["backend"] for _, body in answers} == {"a", "b"}


def test_drain_on_sigterm_finishes_in_flight_requests(upstreams: list[Upstream]) -> None:
    b = Balancer()
    try:
        b.set_routes([route("blog.localhost", upstreams[0])])
        results: list = []

        def slow() -> None:
            try:
                results.append(get(b.conn(), "blog.localhost", "/slow?s=1.5")[0])
            except (OSError, http.client.HTTPException) as exc:
                results.append(repr(exc))

        clients = [threading.Thread(target=slow) for _ in range(10)]
        for c in clients:
            c.start()
        wait_until(lambda: len(upstreams[0].requests) == 10, 10, "requests never arrived")
        idle = b.conn()
        assert get(idle, "blog.localhost")[0] == 200  # a kept-alive idle connection
        b.proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(20)
        assert results == [200] * 10
        assert b.proc.wait(20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", b.port), timeout=2)
    finally:
        b.stop()


def test_several_processes_share_the_port(upstreams: list[Upstream]) -> None:
    b = Balancer("--processes", "2")
    try:
        b.set_routes([route("blog.localhost", upstreams[0])])
        wait_until(lambda: len(children(b.proc.pid)) == 2, 10, "two workers never ran")
        # /healthz answers for the first worker only: the other may read the file later
        wait_until(lambda: (b.dir / "balancer.log").read_text().count("routes version 2") == 2,
                   10, "both workers never read the routes")
        for _ in range(20):
            conn = b.conn()
            assert get(conn, "blog.localhost")[0] == 200
            conn.close()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(20) == 0
    finally:
        b.stop()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_access_log_lines_reach_the_apps_logs(upstreams: list[Upstream], tmp_path: Path) -> None:
    """Each request's line reaches the app's log, and a collector restarted while the
    balancer keeps serving loses none of the lines made meanwhile and writes none twice
    (the shipper resends what was not acknowledged; the collector keeps its marks)."""
    import zmq

    from agents.logs import Collector

    endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    context = zmq.Context()  # its own: not the process-wide one other tests may end

    def released() -> bool:
        """The last listener on the endpoint's port is gone (ZeroMQ closes it a moment
        after the socket): a new one may bind."""
        probe = socket.socket()
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", int(endpoint.rsplit(":", 1)[1])))
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def start_collector() -> tuple[threading.Thread, threading.Event]:
        wait_until(released, 10, "the collector's port stayed taken")
        stop = threading.Event()
        thread = threading.Thread(target=Collector(tmp_path).run,
                                  args=(endpoint, stop, context))
        thread.start()
        return thread, stop

    collector, stop = start_collector()
    b = Balancer("--collector", endpoint)
    try:
        b.set_routes([route("blog.localhost", upstreams[0])])
        conn = b.conn()
        assert get(conn, "blog.localhost", "/hello?x=1")[0] == 200
        assert get(conn, "nope.localhost")[0] == 404  # no app: no app's log to write to
        log = tmp_path / "blog" / "current.log"
        wait_until(lambda: log.exists() and "status=200" in log.read_text(), 30,
                   "no access log line reached the collector")
        (entry,) = log.read_text().splitlines()
        assert f" router.blog.{b.port}.0 at=info method=GET path=\"/hello?x=1\" " in entry
        assert f"backend={upstreams[0].address}" in entry and 'fwd="127.0.0.1"' in entry

        stop.set()  # the collector goes away (a restart) while requests go on ...
        collector.join(5)
        # ... and one that takes the lines but dies before writing or acknowledging them
        # stands in for it meanwhile (a real one does not die on cue between the two).
        wait_until(released, 10, "the collector's port stayed taken")
        dying = context.socket(zmq.ROUTER)
        dying.setsockopt(zmq.LINGER, 0)
        dying.bind(endpoint)
        for i in range(3):
            assert get(conn, "blog.localhost", f"/away-{i}")[0] == 200
        taken = b""

        def took_them() -> bool:
            nonlocal taken
            while dying.poll(100):
                taken += b"".join(dying.recv_multipart())
            return b"/away-2" in taken
        try:
            wait_until(took_them, 30, "the balancer never shipped the lines")
        finally:
            dying.close()
        collector, stop = start_collector()
        assert get(conn, "blog.localhost", "/back")[0] == 200
        wanted = ["/hello?x=1", "/away-0", "/away-1", "/away-2", "/back"]
        wait_until(lambda: all(f'path="{p}"' in log.read_text() for p in wanted), 30,
                   "lines made while the collector was away never reached the log")
        paths = [line.split('path="', 1)[1].split('"', 1)[0]
                 for line in log.read_text().splitlines()]
        assert paths == wanted  # each once, in order
    finally:
        b.stop()
        stop.set()
        collector.join(5)
        context.term()


def make_cert(folder: Path, name: str) -> bytes:
    """A self-signed certificate (and key) for `name` in `folder`; its DER bytes."""
    import ssl

    subject = name.replace("*", "wildcard")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={subject}", "-addext", f"subjectAltName=DNS:{name}",
                    "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")],
                   check=True, capture_output=True)
    return ssl.PEM_cert_to_DER_cert((folder / f"{name}.crt").read_text())


def test_tls_termination_picks_the_certificate_by_sni(upstreams: list[Upstream],
                                                      tmp_path: Path) -> None:
    import ssl

    certs = {name: make_cert(tmp_path, name)
             for name in ("default", "blog.localhost", "*.wild.localhost")}
    tls_port = free_ports(1)[0]
    b = Balancer("--tls-bind", f"127.0.0.1:{tls_port}", "--certs", str(tmp_path))
    try:
        b.set_routes([route("blog.localhost", upstreams[0]),
                      route("*.wild.localhost", upstreams[1]),
                      route("other.localhost", upstreams[1]),
                      {**route("shop.localhost", upstreams[0]), "https_only": True,
                       "hsts": "max-age=31536000"}])
        wait_until(lambda: tls_port in listening(), 10, "no TLS listener")
        cert, reply = tls_get(tls_port, "blog.localhost")
        assert cert == certs["blog.localhost"] and reply.startswith(b"HTTP/1.1 200 ")
        body = json.loads(reply.partition(b"\r\n\r\n")[2])
        assert body["backend"] == "a" and body["headers"]["x-forwarded-proto"] == "https"
        cert, reply = tls_get(tls_port, "a.b.wild.localhost")
        assert cert == certs["*.wild.localhost"] and reply.startswith(b"HTTP/1.1 200 ")
        cert, _ = tls_get(tls_port, "other.localhost")  # no certificate of its own
        assert cert == certs["default"]
        cert, reply = tls_get(tls_port, "blog.localhost", ssl.TLSVersion.TLSv1_2)
        assert reply.startswith(b"HTTP/1.1 200 ")  # TLS 1.2 and 1.3 both served, no older
        from balancer.tls import Certificates
        assert {c.minimum_version for c in Certificates(tmp_path).exact.values()} == {
            ssl.TLSVersion.TLSv1_2}
        assert get(b.conn(), "blog.localhost")[0] == 200  # plain HTTP still served
        conn = b.conn()
        conn.request("GET", "/cart?id=1", headers={"Host": "shop.localhost"})
        reply = conn.getresponse()
        reply.read()
        assert reply.status == 308  # an https-only app: to the same URL on our TLS port
        assert reply.getheader("Location") == f"https://shop.localhost:{tls_port}/cart?id=1"
        _, answer = tls_get(tls_port, "shop.localhost")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nStrict-Transport-Security: max-age=31536000\r\n" in answer
        _, answer = tls_get(tls_port, "blog.localhost")
        assert b"Strict-Transport-Security" not in answer
    finally:
        b.stop()


def listening() -> set[int]:
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}
