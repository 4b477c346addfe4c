"""The router's access log: one line per request, in the app's logs beside its own output,
as Heroku's router writes them (`at=info method=GET path="/" host=... status=200 ...`).

Lines are buffered per app and shipped every half second over the agents' log path: a
ZeroMQ DEALER to the collector's ROUTER, each app's lines one stream (`router.APP.PORT.N`)
of bytes at offsets within an epoch (this process's start); the collector writes each byte
once and acknowledges, and what is not acknowledged within a few seconds is sent again (a
collector restarted loses nothing). The buffers are bounded: past `max_lines` an app's
oldest lines go (counted as dropped), past `max_pending` unacknowledged bytes a new epoch
starts with the newest lines, rather than the balancer's memory growing.
"""

from __future__ import annotations

from collections import deque

SOURCE = "router"


def line(method: bytes, target: bytes, host: str, client: str, status: int, nbytes: int,
         seconds: float, backend: str | None) -> str:
    """One request, Heroku's router format: at, method, path, host, fwd, status, bytes,
    service (ms), backend."""
    path = target.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
    return (f'at={"info" if status < 500 else "error"} method={method.decode("latin-1")} '
            f'path="{path[:2000]}" host={host} fwd="{client}" status={status} '
            f"bytes={nbytes} service={seconds * 1000:.0f}ms backend={backend or '-'}")


class AccessLog:
    def __init__(self, max_lines: int = 10_000) -> None:
        self.max_lines = max_lines
        self.lines: dict[str, deque[str]] = {}
        self.dropped = 0

    def add(self, app: str, text: str) -> None:
        q = self.lines.get(app)
        if q is None:
            q = self.lines[app] = deque()
        if len(q) >= self.max_lines:
            q.popleft()
            self.dropped += 1
        q.append(text)

    def take(self) -> dict[str, bytes]:
        """Each app's lines so far, as one message body; the buffer is emptied."""
        out = {app: ("\n".join(q) + "\n").encode() for app, q in self.lines.items() if q}
        self.lines = {}
        return out


class Stream:
    """One app's lines as a byte stream the collector acknowledges (agents/logs.py)."""

    __slots__ = ("iid", "epoch", "base", "pending", "acked_at")

    def __init__(self, iid: str, epoch: int, now: float) -> None:
        self.iid = iid
        self.epoch = epoch
        self.base = 0
        """The offset of pending[0]: everything before it is acknowledged."""
        self.pending = b""
        self.acked_at = now

    def add(self, data: bytes, max_pending: int, epoch: int) -> None:
        """Queue `data` (sent at `offset_of_last(data)`); too much unacknowledged starts a
        new epoch (the collector then counts from its first offset again)."""
        if len(self.pending) + len(data) > max_pending:
            self.epoch, self.base, self.pending = epoch, 0, b""
        self.pending += data

    def offset_of_last(self, data: bytes) -> int:
        return self.base + len(self.pending) - len(data)

    def ack(self, epoch: int, end: int, now: float) -> None:
        if epoch == self.epoch and end > self.base:
            self.pending = self.pending[end - self.base:]
            self.base = end
        self.acked_at = now
