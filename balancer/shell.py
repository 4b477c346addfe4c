"""The eventlet shell: moves bytes between clients and backends as the core decides.

One green thread per client connection. Sockets are plain non-blocking sockets waited on
through our hub's edge-triggered `io_wait` (balancer/hub.py: no system call per wait;
eventlet's GreenSocket adds a layer of Python per call on the hot path and a timer per
wait). Timeouts cost no timer either: each connection has a
`Watch` (a deadline and the socket it waits on) and one sweeper shuts that socket down
once its deadline passes, which wakes the waiting thread with an end of file and a flag
saying why (idle: close; backend silent: 504).

Backend connections are kept alive in a pool per backend (last in, first out; checked
with a non-blocking peek before reuse, so a backend's own keep-alive timeout rarely bites).
A request that failed on a backend before any byte of its response goes to another one
when the core says it is safe (h1.can_retry); a connection refused also takes the backend
out for a while (passive health). While an app has no usable backend its requests are held
(up to `Timeouts.hold`) and sent as soon as routes change or a backend's cooldown ends.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext, SSLEOFError, SSLSocket, SSLWantReadError, SSLWantWriteError

import eventlet
import eventlet.event
from eventlet import tpool
from eventlet.hubs import get_hub, trampoline

from balancer import accesslog, forward, pages, static
from balancer.bodies import ChunkedBody, CloseBody, LengthBody, body_reader
from balancer.h1 import (
    CHUNKED,
    LENGTH,
    NONE,
    BackendError,
    Limits,
    ProtocolError,
    Request,
    Response,
    can_retry,
    parse_request,
    parse_response,
)
from balancer.hub import Hub as EdgeHub
from balancer.metrics import Metrics
from balancer.routing import Answer, Backend, Challenge, Forward, Redirect, Route, Router
from balancer.tls import RouteCertificates

RECV = 256 * 1024
SMALL_BODY = 64 * 1024
monotonic = time.monotonic
SHUT_RD, SHUT_RDWR = socket.SHUT_RD, socket.SHUT_RDWR


@dataclass(frozen=True)
class Timeouts:
    idle: float = 60.0
    """A kept-alive client connection with no request, or any transfer that stalls."""
    header: float = 10.0
    """A request head, from its first byte."""
    connect: float = 3.0
    """Connecting to a backend."""
    backend: float = 60.0
    """A backend's silence while we wait for (or read) its response: then 504."""
    hold: float = 15.0
    """A request held while its app has no healthy backend: then 503."""
    pool_idle: float = 30.0
    """An idle pooled backend connection is closed after this."""


class Watch:
    """A deadline on the socket a connection's thread waits on (see the module doc)."""

    __slots__ = ("deadline", "sock", "how", "expired", "idle", "proto")

    def __init__(self, sock: socket.socket, deadline: float, proto: bytes = b"http") -> None:
        self.proto = proto
        """The client connection's scheme (X-Forwarded-Proto)."""
        self.sock = sock
        self.deadline = deadline
        self.how = SHUT_RD
        self.expired = False
        self.idle = True

    def expire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            shutdown(self.sock, self.how)


RETRY = object()
"""What an exchange returns when the request may go to another backend."""
STALE = object()
"""What an exchange returns when a pooled connection turned out closed by the backend (its
keep-alive timeout): the same backend may take the request on another connection."""


def shutdown(sock: socket.socket, how: int) -> None:
    """The socket's shutdown, also for a TLS one (whose own shutdown would forget its TLS
    state, so that what follows went out in clear)."""
    socket.socket.shutdown(sock, how)


def wait(sock: socket.socket, write: bool = False) -> None:
    """Until `sock` may be read (or written): an edge-triggered wait on our hub (no system
    call), eventlet's trampoline on another."""
    hub = get_hub()
    if type(hub) is EdgeHub:
        hub.io_wait(sock, sock.fileno(), write)
    else:
        trampoline(sock.fileno(), read=not write, write=write)


def recv(sock: socket.socket) -> bytes:
    while True:
        try:
            data = sock.recv(RECV)
        except (BlockingIOError, SSLWantReadError):
            wait(sock)
            continue
        except SSLWantWriteError:
            wait(sock, write=True)
            continue
        except SSLEOFError:
            return b""
        if len(data) == RECV:  # more may wait: the next wait must not sleep on it
            unread(sock)
        return data


def recv_later(sock: socket.socket) -> bytes:
    """recv when nothing can have arrived yet (the next request on a kept-alive
    connection, a response to what we just sent): wait first, saving a failed recv."""
    if type(sock) is not socket.socket:
        return recv(sock)  # TLS: what was read may wait decrypted inside
    while True:
        wait(sock)
        try:
            data = sock.recv(RECV)
        except BlockingIOError:
            continue
        if len(data) == RECV:
            unread(sock)
        return data


def unread(sock: socket.socket) -> None:
    hub = get_hub()
    if type(hub) is EdgeHub:
        hub.readable(sock.fileno())


def sendall(sock: socket.socket, data: bytes | memoryview) -> None:
    while True:
        try:
            sent = sock.send(data)
        except (BlockingIOError, SSLWantWriteError):
            wait(sock, write=True)
            continue
        except SSLWantReadError:
            wait(sock)
            continue
        if sent == len(data):
            return
        data = memoryview(data)[sent:]


def connect(backend: Backend, timeout: float) -> socket.socket:
    """A new non-blocking connection to `backend`; OSError if refused or too slow."""
    host = backend.host
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.inet_pton(family, host)
        addr: tuple = (host, backend.port)
    except OSError:  # a name: resolve it off the hub
        family, _, _, _, addr = tpool.execute(socket.getaddrinfo, host, backend.port,
                                              type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    err = sock.connect_ex(addr)
    if err == 115:  # EINPROGRESS
        try:
            trampoline(sock.fileno(), write=True, timeout=timeout,
                       timeout_exc=TimeoutError)
        except TimeoutError:
            sock.close()
            raise TimeoutError(f"connecting to {backend.address} took over {timeout}s") from None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        sock.close()
        raise ConnectionRefusedError(err, f"{backend.address}: error {err}")
    return sock


PEEK_AFTER = 0.2
"""A pooled connection idle longer than this is checked (a peek) before reuse: backends
close idle keep-alive connections after a second or more (gunicorn: 2 s)."""


class Pool:
    """Idle keep-alive connections per backend address."""

    def __init__(self, idle_timeout: float, per_backend: int = 64) -> None:
        self.idle_timeout = idle_timeout
        self.per_backend = per_backend
        self.idle: dict[str, list[tuple[socket.socket, float]]] = {}

    def get(self, backend: Backend) -> socket.socket | None:
        stack = self.idle.get(backend.address)
        now = monotonic()
        while stack:
            sock, since = stack.pop()
            if now - since < PEEK_AFTER:
                return sock  # in use moments ago: not worth a syscall to check
            if now - since < self.idle_timeout:
                try:
                    sock.recv(1, socket.MSG_PEEK)  # data or EOF: not reusable
                except BlockingIOError:
                    return sock
                except OSError:
                    pass
            sock.close()
        return None

    def put(self, backend: Backend, sock: socket.socket) -> None:
        stack = self.idle.setdefault(backend.address, [])
        if len(stack) >= self.per_backend:
            stack.pop(0)[0].close()
        stack.append((sock, monotonic()))

    def prune(self, now: float) -> None:
        for address, stack in list(self.idle.items()):
            keep = [(s, t) for s, t in stack if now - t < self.idle_timeout]
            for s, t in stack:
                if now - t >= self.idle_timeout:
                    s.close()
            if keep:
                self.idle[address] = keep
            else:
                del self.idle[address]


class Proxy:
    """Serves client connections with the routes in `router`."""

    def __init__(self, router: Router, limits: Limits, timeouts: Timeouts,
                 metrics: Metrics | None = None,
                 access: accesslog.AccessLog | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.router = router
        self.limits = limits
        self.t = timeouts
        self.pool = Pool(timeouts.pool_idle)
        self.watches: set[Watch] = set()
        self.changed = eventlet.event.Event()
        self.draining = False
        self.metrics = metrics or Metrics()
        self.https_port: int | None = None
        """Where TLS is served: redirects to https name it unless it is 443."""
        self.access = access
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.certificates: RouteCertificates | None = None
        """The routes' certificates, when TLS is served on the platform."""
        self.static: static.StaticStore | None = None
        """Slugs' static files, on the platform (their slugs fetched through the API)."""
        self._preparing: set[str] = set()

    # --- routes and housekeeping ---------------------------------------------------------

    def update_routes(self, routes: list[Route], version: int) -> None:
        """Put new routes in force (and their certificates) and wake the requests held for
        a backend."""
        self.router.update(routes, version)
        if self.certificates is not None:
            for problem in self.certificates.refresh(routes):
                self.log(problem)
        if self.static is not None:
            self.prepare_static(routes)
        old, self.changed = self.changed, eventlet.event.Event()
        old.send(version)

    def prepare_static(self, routes: list[Route]) -> None:
        """Fetch and unpack, in the thread pool, the static files of slugs the routes name
        and we do not have; forget those no route names."""
        assert self.static is not None
        wanted = {r.slug[1]: (r.app, r.slug[0]) for r in routes if r.slug is not None}
        for digest, (app, release) in wanted.items():
            if digest not in self.static.sites and digest not in self._preparing:
                self._preparing.add(digest)
                eventlet.spawn_n(self._prepare_site, app, release, digest)
        self.static.forget_all_but(set(wanted))

    def _prepare_site(self, app: str, release: int, digest: str) -> None:
        assert self.static is not None
        try:
            site = tpool.execute(self.static.prepare, app, release, digest)
        except static.StaticRefused as exc:
            self.log(f"no static files for {app} v{release}: {exc}")
            site = None
        except Exception as exc:  # the API away: tried again at the next routes update
            self.log(f"static files of {app} v{release} not fetched: {exc}")
            self._preparing.discard(digest)
            return
        self.static.sites[digest] = site
        self._preparing.discard(digest)
        if site is not None:
            self.log(f"static files of {app} v{release}: "
                     f"{', '.join(p.decode() for p, _ in site.folders)}")

    def serve_static(self, sock: socket.socket, req: Request, route: Route,
                     started: float, client_ip: str) -> bool | None:
        """A GET or HEAD of a declared static path, answered from the slug; whether to keep
        the connection (None: not ours, forward it)."""
        assert self.static is not None and route.slug is not None
        site = self.static.sites.get(route.slug[1])
        if site is None:
            return None
        path = static.file_for(site, req.target)
        if path is None:
            return None
        keep = req.keep_alive and req.framing == NONE and not self.draining
        try:
            reply = static.response(site, path, static.if_none_match(req.headers),
                                    req.method == b"HEAD", not keep)
        except OSError:  # removed meanwhile (a newer slug): the app answers
            return None
        if reply is None:
            return None
        sendall(sock, reply)
        self.done(route, req, int(reply[9:12]), started, len(reply), None, client_ip)
        return keep

    def sweep(self) -> None:
        """Expire watches past their deadline (and idle connections while draining)."""
        now = monotonic()
        for w in list(self.watches):
            if w.deadline < now or (self.draining and w.idle):
                w.expire()

    # --- client connections ---------------------------------------------------------------

    def handle(self, sock: socket.socket, addr: tuple, tls: SSLContext | None = None) -> None:
        """One client connection: requests, one after the other, until it closes."""
        sock.setblocking(False)
        if tls is not None:
            wrapped = self.handshake(sock, tls)
            if wrapped is None:
                return
            sock = wrapped
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watch = Watch(sock, monotonic() + self.t.idle, b"https" if tls else b"http")
        self.watches.add(watch)
        client_ip = addr[0] if addr else "127.0.0.1"
        buf = b""
        first = True  # a new connection's first request is usually there already
        try:
            while True:
                watch.idle = not buf
                if self.draining and not buf:
                    return
                parsed = None
                while True:
                    if buf:
                        try:
                            parsed = parse_request(buf, self.limits)
                        except ProtocolError as exc:
                            self.refuse(sock, watch, exc.status, exc.message)
                            return
                        if parsed is not None:
                            break
                    data = recv(sock) if buf or first else recv_later(sock)
                    first = False
                    if not data:
                        if buf and watch.expired:
                            self.refuse(sock, watch, 408, "request head took too long")
                        return
                    if not buf:
                        watch.idle = False
                        watch.deadline = monotonic() + self.t.header
                    buf = buf + data if buf else data
                req, size = parsed
                keep, buf = self.serve(sock, watch, req, buf[size:], client_ip)
                if not keep:
                    return
                watch.sock, watch.how = sock, SHUT_RD
                watch.deadline = monotonic() + self.t.idle
        except OSError:
            pass  # the client went away (reset, broken pipe)
        finally:
            self.watches.discard(watch)
            sock.close()

    def handshake(self, raw: socket.socket, tls: SSLContext) -> SSLSocket | None:
        """The TLS handshake (SNI picks the certificate), within the header timeout."""
        watch = Watch(raw, monotonic() + self.t.header)
        watch.how = SHUT_RDWR
        self.watches.add(watch)
        try:
            sock = tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            watch.sock = sock
            while True:
                try:
                    sock.do_handshake()
                    return sock
                except SSLWantReadError:
                    trampoline(sock.fileno(), read=True)
                except SSLWantWriteError:
                    trampoline(sock.fileno(), write=True)
        except OSError:  # ssl.SSLError included: a bad client hello, an old protocol
            raw.close()
            return None
        finally:
            self.watches.discard(watch)

    def refuse(self, sock: socket.socket, watch: Watch, status: int, message: str) -> None:
        """Answer a request we will not forward, then close without resetting: the
        client's unread bytes are read and dropped for a moment (a lingering close)."""
        try:
            sendall(sock, pages.page(status, message))
            shutdown(sock, socket.SHUT_WR)
            watch.deadline = monotonic() + 1.0
            watch.how = SHUT_RD
            for _ in range(16):
                if not recv(sock):
                    break
        except OSError:
            pass

    def answer(self, sock: socket.socket, req: Request, status: int, text: str,
               route: Route | None, started: float, client_ip: str = "") -> bool:
        """Send one of our pages; whether the connection stays open."""
        keep = req.keep_alive and req.framing == NONE and not self.draining
        page = pages.page(status, text, close=not keep, head=req.method == b"HEAD")
        sendall(sock, page)
        self.done(route, req, status, started, len(page), None, client_ip)
        return keep

    def redirect(self, sock: socket.socket, req: Request, route: Route, started: float,
                 client_ip: str) -> bool:
        """The same URL over https (on our TLS port); whether the connection stays open."""
        keep = req.keep_alive and req.framing == NONE and not self.draining
        port = b"" if self.https_port in (None, 443) else b":%d" % self.https_port
        location = b"https://" + req.host.encode() + port + req.target
        reply = pages.redirect(location, close=not keep, head=req.method == b"HEAD")
        sendall(sock, reply)
        self.done(route, req, 308, started, len(reply), None, client_ip)
        return keep

    def challenge(self, sock: socket.socket, req: Request, decision: Challenge,
                  started: float, client_ip: str) -> bool:
        """An ACME CA's HTTP-01 request: the key authorization; whether to keep the
        connection."""
        keep = req.keep_alive and req.framing == NONE and not self.draining
        reply = pages.text(200, decision.key_authorization.encode(), close=not keep,
                           head=req.method == b"HEAD")
        sendall(sock, reply)
        self.done(decision.route, req, 200, started, len(reply), None, client_ip)
        return keep

    def done(self, route: Route | None, req: Request, status: int, started: float,
             nbytes: int, backend: Backend | None, client_ip: str) -> None:
        """A request answered: router metrics, and the access log when one is kept."""
        seconds = monotonic() - started
        app = route.app if route else None
        self.metrics.record(app, status, seconds)
        if self.access is not None and app is not None:
            self.access.add(app, accesslog.line(
                req.method, req.target, req.host, client_ip, status, nbytes, seconds,
                backend.address if backend else None))

    # --- one request ----------------------------------------------------------------------

    def serve(self, sock: socket.socket, watch: Watch, req: Request, buf: bytes,
              client_ip: str) -> tuple[bool, bytes]:
        """Route one request and answer it; (keep the connection, bytes after it)."""
        started = monotonic()
        router = self.router
        tried: tuple[Backend, ...] = ()
        failed = False  # a backend refused or reset: 502 rather than 503 at the end
        hold_until = 0.0
        while True:
            now = monotonic()
            decision = router.decide(req.host, now, tried, watch.proto == b"https", req.target)
            if type(decision) is Forward:
                if (decision.route.slug is not None and self.static is not None
                        and req.method in (b"GET", b"HEAD")):
                    kept = self.serve_static(sock, req, decision.route, started, client_ip)
                    if kept is not None:
                        return kept, buf
                backend = decision.backend
                backend.active += 1
                try:
                    outcome = self.exchange(sock, watch, req, buf, backend, client_ip,
                                            decision.route, started)
                finally:
                    backend.active -= 1
                if outcome is STALE:
                    continue
                if outcome is not RETRY:
                    return outcome  # type: ignore[return-value]
                tried += (backend,)
                failed = True
                self.metrics.retried(decision.route.app)
                continue
            if type(decision) is Redirect:
                return self.redirect(sock, req, decision.route, started, client_ip), buf
            if type(decision) is Challenge:
                return self.challenge(sock, req, decision, started, client_ip), buf
            if type(decision) is Answer:
                hit = router.lookup(req.host)
                text = pages.MAINTENANCE if decision.status == 503 else pages.UNKNOWN_HOST
                return self.answer(sock, req, decision.status, text,
                                   hit[0] if hit else None, started, client_ip), buf
            route = decision.route
            if not hold_until:
                hold_until = now + self.t.hold
                self.metrics.held(route.app)
            if now >= hold_until:
                status, text = (502, pages.BAD_GATEWAY) if failed else (503, pages.NO_BACKEND)
                return self.answer(sock, req, status, text, route, started, client_ip), buf
            hit = router.lookup(req.host)
            wake = router.next_wake(hit[1], now) if hit else None
            until = min(hold_until, wake) if wake else hold_until
            self.changed.wait(max(0.001, until - now))
            tried = ()

    def exchange(self, csock: socket.socket, watch: Watch, req: Request, buf: bytes,
                 backend: Backend, client_ip: str, route: Route,
                 started: float) -> object:
        """Send `req` to `backend` and its response to the client: (keep, rest) or RETRY."""
        bsock = self.pool.get(backend)
        reused = bsock is not None
        if bsock is None:
            try:
                bsock = connect(backend, self.t.connect)
            except OSError as exc:
                self.router.failed(backend, monotonic())
                self.log(f"backend {backend.address} of {route.app}: {exc}")
                return RETRY
        pooled = False
        try:
            outcome = self._exchange(csock, bsock, watch, req, buf, backend, client_ip,
                                     reused, route, started)
            if type(outcome) is tuple and outcome[2]:
                self.pool.put(backend, bsock)
                pooled = True
                return outcome[:2]
            return outcome if type(outcome) is not tuple else outcome[:2]
        finally:
            if not pooled:
                bsock.close()

    def _exchange(self, csock: socket.socket, bsock: socket.socket, watch: Watch,
                  req: Request, buf: bytes, backend: Backend, client_ip: str, reused: bool,
                  route: Route, started: float) -> object:
        head = forward.request_head(req, client_ip, watch.proto)
        body: LengthBody | ChunkedBody | None = None
        if req.framing == LENGTH:
            body = LengthBody(req.length)
        elif req.framing == CHUNKED:
            body = ChunkedBody(self.limits.max_body)
        try:
            if body is None:
                sendall(bsock, head)
            else:
                rest = self.send_body(csock, bsock, watch, req, body, head, buf)
                if rest is None:
                    return False, b"", False  # the client left or sent a bad body
                buf = rest
        except OSError:
            # the backend went away while we sent: a stale pooled connection, or it died
            if can_retry(req, sent=body is not None):
                if reused:
                    return STALE
                self.router.failed(backend, monotonic())
                return RETRY
            return self.answer(csock, req, 502, pages.BAD_GATEWAY, route, started,
                               client_ip), b"", False
        return self.relay_response(csock, bsock, watch, req, buf, backend, reused, route,
                                   started, client_ip)

    def send_body(self, csock: socket.socket, bsock: socket.socket, watch: Watch,
                  req: Request, body: LengthBody | ChunkedBody, head: bytes,
                  buf: bytes) -> bytes | None:
        """Stream the request body to the backend as it comes; the bytes after it, or None
        when the client left or sent a body we refuse (answered here)."""
        frame = forward.chunk if req.framing == CHUNKED else None
        try:
            piece = body.feed(buf) if buf else b""
        except ProtocolError as exc:
            self.refuse(csock, watch, exc.status, exc.message)
            return None
        out = head + (frame(piece) if frame and piece else piece)
        if body.done and frame:
            out += forward.LAST_CHUNK
        sendall(bsock, out)
        watch.sock, watch.how = csock, SHUT_RD
        try:
            if req.expect_continue and not buf:
                sendall(csock, forward.CONTINUE)
        except OSError:
            return None
        while not body.done:
            watch.deadline = monotonic() + self.t.idle
            try:
                data = recv(csock)
            except OSError:
                data = b""
            if not data:
                return None
            try:
                piece = body.feed(data)
            except ProtocolError as exc:
                self.refuse(csock, watch, exc.status, exc.message)
                return None
            if frame:
                out = frame(piece) if piece else b""
                if body.done:
                    out += forward.LAST_CHUNK
            else:
                out = piece
            if out:
                sendall(bsock, out)
        return body.rest

    def relay_response(self, csock: socket.socket, bsock: socket.socket, watch: Watch,
                       req: Request, buf: bytes, backend: Backend, reused: bool,
                       route: Route, started: float, client_ip: str) -> object:
        watch.sock, watch.how = bsock, SHUT_RDWR
        watch.deadline = monotonic() + self.t.backend
        watch.expired = False
        rbuf = b""
        resp: Response | None = None
        while resp is None:
            try:
                data = recv(bsock) if rbuf else recv_later(bsock)
            except OSError:
                data = b""
            if not data:
                if watch.expired:
                    watch.expired = False
                    return self.answer(csock, req, 504, pages.GATEWAY_TIMEOUT, route,
                                       started, client_ip), buf, False
                if not rbuf and can_retry(req, sent=True):
                    if reused:
                        return STALE
                    self.router.failed(backend, monotonic())
                    return RETRY
                return self.answer(csock, req, 502, pages.BAD_GATEWAY, route,
                                   started, client_ip), buf, False
            rbuf = rbuf + data if rbuf else data
            while True:
                try:
                    parsed = parse_response(rbuf, req.method, self.limits)
                except BackendError as exc:
                    self.log(f"backend {backend.address} of {route.app}: {exc}")
                    return self.answer(csock, req, 502, pages.BAD_GATEWAY, route,
                                       started, client_ip), buf, False
                if parsed is None:
                    break
                resp, size = parsed
                rbuf = rbuf[size:]
                if resp.status >= 200 or resp.status == 101:
                    break
                resp = None  # an interim response (103 Early Hints...): not relayed
        if backend.failures:
            self.router.succeeded(backend)
        if resp.status == 101:
            if req.upgrade is None:
                return self.answer(csock, req, 502, pages.BAD_GATEWAY, route,
                                   started, client_ip), buf, False
            head, _, _ = forward.response_head(resp, req, True)
            self.done(route, req, 101, started, 0, backend, client_ip)
            self.tunnel(csock, bsock, watch, head + rbuf, buf)
            return False, b"", False
        keep = req.keep_alive and not self.draining
        extra = b""
        if route.hsts and watch.proto == b"https":
            extra = b"Strict-Transport-Security: %s\r\n" % route.hsts.encode()
        head, framing, keep = forward.response_head(resp, req, keep, extra)
        rbody = body_reader(resp.framing, resp.length)
        if rbody is None:
            sendall(csock, head)
            reusable = resp.reusable and not rbuf
            self.done(route, req, resp.status, started, 0, backend, client_ip)
            return keep, buf, reusable and not watch.expired
        frame = forward.chunk if framing == CHUNKED else None
        piece = rbody.feed(rbuf) if rbuf else b""
        out = head + (frame(piece) if frame and piece else piece)
        # A small body of known length (gunicorn writes the head, then the body) goes
        # out with its head in one send: one write and one segment for the client, not two.
        small = framing == LENGTH and resp.length <= SMALL_BODY
        while not rbody.done:
            if out and not small:
                watch.sock, watch.how = csock, SHUT_RDWR
                watch.deadline = monotonic() + self.t.idle
                sendall(csock, out)
                out = b""
                watch.sock, watch.how = bsock, SHUT_RDWR
            watch.deadline = monotonic() + self.t.backend
            try:
                data = recv(bsock)
            except OSError:
                data = b""
            if not data and type(rbody) is not CloseBody:
                self.log(f"backend {backend.address} of {route.app} closed mid-response")
                return False, b"", False  # the client sees its response cut short
            try:
                piece = rbody.feed(data)
            except ProtocolError:
                self.log(f"backend {backend.address} of {route.app}: bad chunked framing")
                return False, b"", False
            if frame and piece:
                piece = frame(piece)
            out = out + piece if out else piece
        if frame:
            out += forward.LAST_CHUNK
        if out:
            sendall(csock, out)
        self.done(route, req, resp.status, started, rbody.total, backend, client_ip)
        return keep, buf, resp.reusable and not rbody.rest and not watch.expired

    def tunnel(self, csock: socket.socket, bsock: socket.socket, watch: Watch,
               to_client: bytes, to_backend: bytes) -> None:
        """After 101 Switching Protocols: bytes both ways until both sides are done."""
        sendall(csock, to_client)
        if to_backend:
            sendall(bsock, to_backend)
        watch.sock, watch.how = csock, SHUT_RDWR
        watch.deadline = monotonic() + self.t.idle
        other = eventlet.spawn(self._pipe, bsock, csock, watch)
        try:
            self._pipe(csock, bsock, watch)
        finally:
            other.wait()

    def _pipe(self, src: socket.socket, dst: socket.socket, watch: Watch) -> None:
        try:
            while True:
                data = recv(src)
                if not data:
                    break
                watch.deadline = monotonic() + self.t.idle
                sendall(dst, data)
        except OSError:
            pass
        for sock, how in ((dst, socket.SHUT_WR), (src, SHUT_RD)):
            with contextlib.suppress(OSError):
                shutdown(sock, how)


def accept_forever(proxy: Proxy, listener: socket.socket, tls: SSLContext | None = None) -> None:
    """Accept until the listener is shut down (SIGTERM), a green thread per client."""
    listener.setblocking(False)
    fd = listener.fileno()
    while not proxy.draining:
        try:
            sock, addr = listener.accept()
        except BlockingIOError:
            try:
                trampoline(fd, read=True)
            except OSError:
                return
            continue
        except OSError as exc:
            if proxy.draining:
                return
            proxy.log(f"accept: {exc}")  # EMFILE and the like: breathe, go on
            eventlet.sleep(0.1)
            continue
        eventlet.spawn_n(proxy.handle, sock, addr, tls)
