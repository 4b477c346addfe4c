"""The heads the balancer sends: a request rebuilt for the backend, a response rebuilt for
the client. Both are framed by us (Content-Length or chunked, never a header copied from
the other side), carry `Via`, and lose every hop-by-hop header (h1.HOP_BY_HOP and whatever
`Connection` named). The backend learns who asked through `X-Forwarded-For` (the client's
address appended to any it sent), `X-Forwarded-Proto` and `X-Forwarded-Host` (always ours).
"""

from __future__ import annotations

from balancer.h1 import CHUNKED, CLOSE, LENGTH, Request, Response

VIA = b"1.1 tally"
VIA_LINE = b"Via: 1.1 tally\r\n"


def request_head(req: Request, client_ip: str, proto: bytes) -> bytes:
    """The head sent to the backend: HTTP/1.1, kept alive, framed as we will send it."""
    client = client_ip.encode("ascii")
    forwarded = client if req.forwarded_for is None else req.forwarded_for + b", " + client
    out = [req.method, b" ", req.target, b" HTTP/1.1\r\n", *req.headers,
           b"X-Forwarded-For: ", forwarded, b"\r\nX-Forwarded-Proto: ", proto,
           b"\r\nX-Forwarded-Host: ", req.raw_host, b"\r\n", VIA_LINE]
    if req.framing == LENGTH:
        out += (b"Content-Length: ", b"%d" % req.length, b"\r\n")
    elif req.framing == CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if req.upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def response_head(resp: Response, req: Request, keep_alive: bool,
                  extra: bytes = b"") -> tuple[bytes, int, bool]:
    """The head sent to the client, how to frame the body after it, and whether the client
    connection stays open afterwards.

    A chunked body stays chunked for an HTTP/1.1 client; an HTTP/1.0 client, or a body
    that ends only when the backend closes, gets it until we close the connection.
    `extra`: header lines of ours (each ending in CRLF), e.g. Strict-Transport-Security."""
    framing = resp.framing
    if framing == CLOSE or (framing == CHUNKED and req.http10):
        framing, keep_alive = CLOSE, False
    out = [b"HTTP/1.1 %d " % resp.status, resp.reason, b"\r\n", *resp.headers, extra, VIA_LINE]
    if framing == LENGTH:
        out += (b"Content-Length: ", b"%d" % resp.length, b"\r\n")
    elif framing == CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n")
    if resp.status == 101 and resp.upgrade is not None:
        out += (b"Connection: upgrade\r\nUpgrade: ", resp.upgrade, b"\r\n")
    elif not keep_alive:
        out.append(b"Connection: close\r\n")
    elif req.http10:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing, keep_alive


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty `data` would end the body: never sent)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
