"""HTTP/1.1 message heads, sans-IO (RFC 9112): bytes in, a parsed request or response out.

The balancer stands between the open internet and apps whose HTTP parsers we do not know, so
it parses strictly and refuses whatever two parsers could read differently (request
smuggling): Content-Length together with Transfer-Encoding, a duplicate or malformed
Content-Length, a Transfer-Encoding other than one `chunked`, obs-fold, whitespace before a
header's colon, a bare CR or LF. A refusal is a `ProtocolError` carrying the status to
answer (400, 413, 414, 417, 431, 505); the shell answers it and closes the connection, and the
backend never sees the request. The backend then gets a head rebuilt by us, framed by us
(`forward.py`): never the client's bytes.

Parsing works on the whole head at once (found by its blank line): one regular expression
validates the header block, another splits it; header lines are kept as received and
forwarded as they are. The per-request cost here is much of the balancer's speed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NONE, LENGTH, CHUNKED, CLOSE = 0, 1, 2, 3
"""Body framings: no body, Content-Length, chunked, until the connection closes."""


class ProtocolError(Exception):
    """A message we refuse; `status` is what to answer (as h11's carries its 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_request_line: int = 8 * 1024
    """Longer request lines get 414."""
    max_head: int = 64 * 1024
    """A request head (request line and headers) over this gets 431."""
    max_headers: int = 200
    """More header lines than this get 431 too."""
    max_body: int = 1024 * 1024 * 1024
    """A request body over this (declared or streamed) gets 413."""


@dataclass(slots=True)
class Request:
    """A parsed request head. Treated as a value once parsed."""

    method: bytes
    target: bytes
    """Origin-form (an absolute-form target is reduced to its path and query)."""
    http10: bool
    headers: list[bytes]
    """End-to-end header lines as received (CRLF included); hop-by-hop, framing and
    X-Forwarded-* ones removed."""
    host: str
    """Lower case, without port or trailing dot: what routing looks up."""
    raw_host: bytes
    framing: int
    length: int = 0
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: bytes | None = None
    """The Upgrade header's value when the client asked to switch protocols."""
    forwarded_for: bytes | None = None


@dataclass(slots=True)
class Response:
    """A parsed response head from a backend."""

    status: int
    reason: bytes
    headers: list[bytes]
    """End-to-end header lines (CRLF included)."""
    framing: int
    length: int = 0
    reusable: bool = True
    """Whether the backend connection may carry another request afterwards."""
    upgrade: bytes | None = None


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
"""A header block (every line with its CRLF): field names are tokens right before the
colon; values hold no CTL but HTAB (so no bare CR or LF, no NUL); no line starts with
whitespace (obs-fold)."""
_FIELD = re.compile(rb"((" + _TOKEN + rb"):([^\r]*)\r\n)")
"""One header line of a block that matched _BLOCK: (line, name, value with its OWS)."""
_HOST = re.compile(r"(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_ABSOLUTE = re.compile(rb"https?://([^/?#]*)([^#]*)", re.IGNORECASE)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    b"content-length", b"expect",
})
"""Headers that describe one connection, not the message (RFC 9110 7.6.1), and the framing
ones we set ourselves."""
_OURS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                   b"x-forwarded-port"})
"""Set by the balancer: a client must not claim https, another host or another address
(its X-Forwarded-For is kept, with the address we saw appended)."""
_REQUEST_SPECIAL = HOP_BY_HOP | _OURS | {b"host"}


def _head_bounds(buf: bytes, start: int, limits: Limits) -> int:
    """Index of the blank line ending the head that starts at `start`, or -1 for more."""
    end = buf.find(b"\r\n\r\n", start)
    line_end = buf.find(b"\r\n", start)
    if (line_end < 0 and len(buf) - start > limits.max_request_line) or (
            line_end - start > limits.max_request_line):
        raise ProtocolError(414, "request line too long")
    if end < 0:
        if len(buf) - start > limits.max_head:
            raise ProtocolError(431, "request headers too large")
        if buf.count(b"\n", start) != buf.count(b"\r\n", start):
            raise ProtocolError(400, "bare LF in the request head")
        return -1
    if end - start > limits.max_head:
        raise ProtocolError(431, "request headers too large")
    return end


def _fields(buf: bytes, start: int, end: int) -> list[tuple[bytes, bytes, bytes]] | None:
    """(line, name, value) of each header line in buf[start:end] (a block ending in CRLF),
    or None when the block is malformed."""
    if _BLOCK.fullmatch(buf, start, end) is None:
        return None
    return _FIELD.findall(buf, start, end)


def _bad_line(buf: bytes, start: int, end: int) -> bytes:
    """The first header line of a malformed block."""
    lines = buf[start:end - 2].split(b"\r\n")
    return next((line for line in lines if _BLOCK.fullmatch(line + b"\r\n") is None),
                lines[0])


def parse_request(buf: bytes, limits: Limits) -> tuple[Request, int] | None:
    """The request whose head starts `buf` and the length of that head, or None when the
    head is not complete yet. Raises ProtocolError for anything we refuse."""
    start = 0
    while buf.startswith(b"\r\n", start):  # RFC 9112 2.2: ignore CRLFs before a request
        start += 2
    end = _head_bounds(buf, start, limits)
    if end < 0:
        return None
    line_end = buf.find(b"\r\n", start)
    m = _REQUEST_LINE.fullmatch(buf, start, line_end)
    if m is None:
        raise ProtocolError(400, "malformed request line")
    method, target, major, minor = m.groups()
    if major != b"1":
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    http10 = minor == b"0"
    fields = _fields(buf, line_end + 2, end + 2)
    if fields is None:
        raise ProtocolError(400, _header_problem(_bad_line(buf, line_end + 2, end + 2)))
    if len(fields) > limits.max_headers:
        raise ProtocolError(431, "too many request headers")
    headers: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    hosts: list[bytes] = []
    connection: list[bytes] = []
    expect = upgrade = forwarded_for = None
    special = _REQUEST_SPECIAL
    for line, name, value in fields:
        lower = name.lower()
        if lower not in special:
            headers.append(line)
        elif lower == b"host":
            hosts.append(value.strip(b" \t"))
            headers.append(line)
        elif lower == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif lower == b"transfer-encoding":
            codings.extend(_tokens(value))
        elif lower == b"connection":
            connection.extend(_tokens(value))
        elif lower == b"expect":
            expect = value.strip(b" \t").lower()
        elif lower == b"upgrade":
            upgrade = value.strip(b" \t")
        elif lower == b"x-forwarded-for":
            value = value.strip(b" \t")
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
    if connection:
        headers = _without(headers, connection)
    target, raw_host, host = _target_and_host(method, target, hosts, http10)
    framing, length = _request_framing(lengths, codings, http10, limits)
    if expect is not None and expect != b"100-continue":
        raise ProtocolError(417, "only Expect: 100-continue is understood")
    keep_alive = b"keep-alive" in connection if http10 else b"close" not in connection
    request = Request(
        method, target, http10, headers, host, raw_host, framing, length, keep_alive,
        expect is not None and framing != NONE,
        upgrade if upgrade and b"upgrade" in connection and not http10 else None,
        forwarded_for)
    return request, end + 4


def _without(lines: list[bytes], named: list[bytes]) -> list[bytes]:
    """Lines of headers the Connection header did not name (RFC 9110 7.6.1: those are for
    this hop only)."""
    drop = set(named)
    return [line for line in lines if line[:line.find(b":")].lower() not in drop]


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def _header_problem(line: bytes) -> str:
    """Why a header line did not parse: worth a precise message, and off the hot path."""
    if line[:1] in (b" ", b"\t"):
        return "obsolete line folding (obs-fold) in a header"
    name, colon, _ = line.partition(b":")
    if not colon:
        return "header line without a colon"
    if name[-1:] in (b" ", b"\t"):
        return "whitespace between a header name and its colon"
    if b"\r" in line or b"\n" in line:
        return "bare CR or LF in a header"
    if not re.fullmatch(_TOKEN, name):
        return "invalid header name"
    return "invalid character in a header value"


def _target_and_host(method: bytes, target: bytes, hosts: list[bytes],
                     http10: bool) -> tuple[bytes, bytes, str]:
    """(origin-form target, Host as sent, the name to route by)."""
    if len(hosts) > 1:
        raise ProtocolError(400, "more than one Host header")
    host = hosts[0] if hosts else None
    if target.startswith(b"/") or (target == b"*" and method == b"OPTIONS"):
        pass  # origin-form, or asterisk-form where it is allowed
    elif (m := _ABSOLUTE.fullmatch(target)) is not None:
        host = m.group(1)  # RFC 9112 3.2.2: the target's authority wins over Host
        target = m.group(2) or b"/"
    elif method == b"CONNECT":
        raise ProtocolError(405, "CONNECT is not served: this is not a forward proxy")
    else:
        raise ProtocolError(400, "malformed request target")
    if host is None:
        if not http10:
            raise ProtocolError(400, "missing Host header")
        return target, b"", ""
    return target, host, route_host(host)


_HOSTS: dict[bytes, str] = {}


def route_host(raw: bytes) -> str:
    """The name to route by: lower case, no port, no trailing dot; ProtocolError(400) for
    a malformed Host. Remembered (a few thousand names): the same few come again and
    again."""
    name = _HOSTS.get(raw)
    if name is not None:
        return name
    text = raw.decode("latin-1").lower()
    if text and not _HOST.fullmatch(text):
        raise ProtocolError(400, "malformed Host header")
    bracket = text.find("]")  # an IPv6 literal: [::1]:8080
    name = text[:bracket + 1] if bracket > 0 else text.partition(":")[0].rstrip(".")
    if len(_HOSTS) >= 4096:
        _HOSTS.clear()
    _HOSTS[raw] = name
    return name


def _request_framing(lengths: list[bytes], codings: list[bytes], http10: bool,
                     limits: Limits) -> tuple[int, int]:
    if codings:
        if lengths:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        if http10:
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings != [b"chunked"]:
            raise ProtocolError(400, "Transfer-Encoding other than a single final chunked")
        return CHUNKED, 0
    if not lengths:
        return NONE, 0
    if len(lengths) > 1:
        raise ProtocolError(400, "more than one Content-Length")
    if _DIGITS.fullmatch(lengths[0]) is None:
        raise ProtocolError(400, "invalid Content-Length")
    length = int(lengths[0])
    if length > limits.max_body:
        raise ProtocolError(413, f"request body over {limits.max_body} bytes")
    return (LENGTH, length) if length else (NONE, 0)


class BackendError(Exception):
    """A backend's reply we cannot relay (502)."""


def parse_response(buf: bytes, method: bytes, limits: Limits) -> tuple[Response, int] | None:
    """The backend response whose head starts `buf` and that head's length, or None for
    more. Interim 1xx responses other than 101 are returned too; the caller skips them.
    Raises BackendError for a reply we will not relay."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > limits.max_head:
            raise BackendError("response head too large")
        return None
    line_end = buf.find(b"\r\n")
    m = _STATUS_LINE.fullmatch(buf, 0, line_end)
    if m is None:
        raise BackendError("malformed status line")
    minor, code, reason = m.groups()
    status = int(code)
    fields = _fields(buf, line_end + 2, end + 2)
    if fields is None:
        raise BackendError("malformed response header")
    headers: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    upgrade = None
    for line, name, value in fields:
        lower = name.lower()
        if lower not in HOP_BY_HOP:
            headers.append(line)
        elif lower == b"content-length":
            lengths.extend(_tokens(value))
        elif lower == b"transfer-encoding":
            codings.extend(_tokens(value))
        elif lower == b"connection":
            connection.extend(_tokens(value))
        elif lower == b"upgrade":
            upgrade = value.strip(b" \t")
    if connection and connection != [b"keep-alive"]:
        headers = _without(headers, connection)
    reusable = minor == b"1" and b"close" not in connection
    framing, length = NONE, 0
    if method == b"HEAD" or status < 200 or status in (204, 304):
        if lengths and status != 204:  # the size of what a GET would get: keep it
            headers.append(b"Content-Length: %s\r\n" % lengths[0])
    elif codings:
        if codings[-1] != b"chunked":
            framing, reusable = CLOSE, False
        else:
            framing = CHUNKED
            reusable = reusable and not lengths
    elif lengths:
        if len(set(lengths)) != 1 or _DIGITS.fullmatch(lengths[0]) is None:
            raise BackendError("invalid Content-Length in the response")
        length = int(lengths[0])
        framing = LENGTH if length else NONE
    else:
        framing, reusable = CLOSE, False
    response = Response(status, reason or b"", headers, framing, length, reusable,
                        upgrade if status == 101 else None)
    return response, end + 4


IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def can_retry(req: Request, sent: bool) -> bool:
    """Whether a request that failed on one backend may go to another: always when none of
    it was sent (connection refused), else only an idempotent one without a body (RFC 9110
    9.2.2), whose bytes we still have, and never an upgrade."""
    if not sent:
        return True
    return req.method in IDEMPOTENT and req.framing == NONE and req.upgrade is None
