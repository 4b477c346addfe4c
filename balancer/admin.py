"""The admin port: `/metrics` (Prometheus text) and `/healthz`, for operators only (bind
it to a private address). A tiny HTTP/1.0 responder on the same hub; one request per
connection."""

from __future__ import annotations

import socket

import eventlet

from balancer.h1 import Limits, ProtocolError, parse_request
from balancer.shell import Proxy, recv, sendall

LIMITS = Limits(max_body=0)


def serve_admin(proxy: Proxy, listener: socket.socket) -> None:
    listener.setblocking(False)
    fd = listener.fileno()
    from eventlet.hubs import trampoline

    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            trampoline(fd, read=True)
            continue
        except OSError:
            return
        eventlet.spawn_n(_answer, proxy, sock)


def _answer(proxy: Proxy, sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with eventlet.Timeout(5):
            buf = b""
            parsed = None
            while parsed is None:
                data = recv(sock)
                if not data:
                    return
                buf += data
                parsed = parse_request(buf, LIMITS)
            req = parsed[0]
            if req.target == b"/metrics":
                status, ctype, body = 200, "text/plain; version=0.0.4", \
                    proxy.metrics.prometheus().encode()
            elif req.target == b"/healthz":
                status, ctype = 200, "text/plain"
                body = f"ok routes version {proxy.router.version}\n".encode()
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            sendall(sock, f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                          f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                          f"Connection: close\r\n\r\n".encode() + body)
    except (OSError, ProtocolError, eventlet.Timeout):
        pass
    finally:
        sock.close()
