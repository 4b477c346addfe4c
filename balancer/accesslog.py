"""The router's access log: one line per request, in the app's logs beside its own output,
as Heroku's router writes them (`at=info method=GET path="/" host=... status=200 ...`).

Lines are buffered per app and shipped every half second over the agents' log path (ZeroMQ
PUSH to the collector, which stamps them and appends them to the app's log as from
`router`). The buffer is bounded: past `max_lines` an app's oldest lines go (and are counted
as dropped) rather than the balancer's memory.
"""

from __future__ import annotations

from collections import deque

SOURCE = b"router"


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

    def put_back(self, app: str, data: bytes) -> None:
        """Lines the collector could not take yet go first next time."""
        old = self.lines.get(app, deque())
        self.lines[app] = deque(data.decode().splitlines())
        for text in old:
            self.add(app, text)
