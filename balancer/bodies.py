"""Message bodies, sans-IO: readers that take bytes as they arrive and give back the
payload, whether the body is complete, and what follows it (the next pipelined message).

A chunked body is decoded (and re-encoded by the sender): the receiver of our bytes then
never depends on how it would have read the sender's chunk extensions or trailers.
"""

from __future__ import annotations

import re

from balancer.h1 import CHUNKED, CLOSE, LENGTH, ProtocolError

_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?")
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 64 * 1024


class LengthBody:
    """Exactly `remaining` bytes."""

    __slots__ = ("remaining", "rest", "total")

    def __init__(self, length: int) -> None:
        self.remaining = length
        self.rest = b""
        self.total = 0

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, data: bytes) -> bytes:
        n = self.remaining
        if len(data) > n:
            data, self.rest = data[:n], data[n:]
        self.remaining -= len(data)
        self.total += len(data)
        return data


class CloseBody:
    """Whatever comes until the peer closes: `feed(b"")` says it did."""

    __slots__ = ("done", "rest", "total")

    def __init__(self) -> None:
        self.done = False
        self.rest = b""
        self.total = 0

    def feed(self, data: bytes) -> bytes:
        if not data:
            self.done = True
        self.total += len(data)
        return data


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedBody:
    """RFC 9112 7.1: hex sizes (no sign, no 0x, at most 15 digits), extensions ignored, each
    chunk followed by exactly CRLF, trailers read and dropped. `limit` bounds the decoded
    size (413); anything malformed is a ProtocolError(400)."""

    __slots__ = ("state", "remaining", "buf", "rest", "total", "limit", "trailer_bytes")

    def __init__(self, limit: int | None = None) -> None:
        self.state = _SIZE
        self.remaining = 0
        self.buf = b""
        self.rest = b""
        self.total = 0
        self.limit = limit
        self.trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes) -> bytes:
        """The payload in `data` (possibly empty). After the last chunk, the bytes that
        followed are in `rest`. Feeding b"" (the peer closed) before the end is an error."""
        if self.state == _DONE:
            self.rest += data
            return b""
        if not data:
            raise ProtocolError(400, "connection closed inside a chunked body")
        data = self.buf + data if self.buf else data
        self.buf = b""
        out: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == _DATA:
                take = min(self.remaining, n - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _DATA_END
            elif state == _DATA_END:
                if n - pos < 2:
                    self.buf = data[pos:]
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise ProtocolError(400, "chunk data not followed by CRLF")
                pos += 2
                self.state = _SIZE
            elif state == _SIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._keep(data, pos, MAX_CHUNK_LINE, "chunk size line too long")
                    break
                m = _CHUNK_SIZE.fullmatch(data, pos, end)
                if m is None:
                    raise ProtocolError(400, "invalid chunk size")
                size = int(m.group(1), 16)
                pos = end + 2
                self.total += size
                if self.limit is not None and self.total > self.limit:
                    raise ProtocolError(413, f"request body over {self.limit} bytes")
                if size:
                    self.state, self.remaining = _DATA, size
                else:
                    self.state = _TRAILER
            elif state == _TRAILER:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self._keep(data, pos, MAX_TRAILERS, "trailers too large")
                    break
                self.trailer_bytes += end - pos + 2
                if self.trailer_bytes > MAX_TRAILERS:
                    raise ProtocolError(431, "trailers too large")
                if end == pos:
                    self.state = _DONE
                    self.rest = data[end + 2:]
                    break
                if b"\n" in data[pos:end] or b":" not in data[pos:end]:
                    raise ProtocolError(400, "malformed trailer")
                pos = end + 2
        return b"".join(out) if len(out) != 1 else out[0]

    def _keep(self, data: bytes, pos: int, limit: int, message: str) -> None:
        tail = data[pos:]
        if len(tail) > limit:
            raise ProtocolError(400, message)
        if b"\n" in tail:
            raise ProtocolError(400, "bare LF in chunked framing")
        self.buf = tail


Body = LengthBody | ChunkedBody | CloseBody


def body_reader(framing: int, length: int, limit: int | None = None) -> Body | None:
    """A reader for a body framed so, or None when there is no body."""
    if framing == LENGTH:
        return LengthBody(length)
    if framing == CHUNKED:
        return ChunkedBody(limit)
    if framing == CLOSE:
        return CloseBody()
    return None
