"""What a host agent observed and has not delivered yet, in order, on disk.

When the API or the ledger is away the agent keeps running its apps and keeps observing
(an instance exits, restarts, becomes healthy). Each report gets an idempotency key when
it is observed and goes to the end of this file before any attempt to send it; sending
goes strictly from the front, and an item leaves the file only once the API recorded it.
So a report is never lost (a killed agent finds the file on restart), never reordered
(nothing is sent while an older one waits), and never doubled (an item sent twice, e.g.
when the agent died between the API's answer and the rewrite of the file, carries the
same key, and the ledger records it once).

A report the API refuses (a 4xx: e.g. the instance is no longer this host's) is dropped
with a warning: sending it again would be refused again and would block the rest.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agents.api_client import ApiAway, ApiRefused

log = logging.getLogger("tally.agent.outbox")


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = []
        self.dropped = 0
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.items.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash mid-write: never sent, never acked

    def put(self, item: dict[str, Any]) -> dict[str, Any]:
        """Keep one report (adding its key), on disk before anything else happens."""
        item = {**item, "key": item.get("key") or uuid.uuid4().hex}
        with _private(self.path, os.O_APPEND) as f:
            f.write(json.dumps(item, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.items.append(item)
        return item

    def flush(self, send: Callable[[dict[str, Any]], None]) -> int:
        """Send from the front until done or the API is away; returns how many left."""
        sent = 0
        try:
            while sent < len(self.items):
                try:
                    send(self.items[sent])
                except ApiRefused as exc:
                    self.dropped += 1
                    log.warning("report dropped, the API refused it: %s", exc)
                sent += 1
        except ApiAway as exc:
            if sent or len(self.items) == 1:
                log.warning("API away; %d report(s) kept to send later: %s",
                            len(self.items) - sent, exc)
        finally:
            if sent:
                self.items = self.items[sent:]
                self._rewrite()
        return sent

    def _rewrite(self) -> None:
        part = self.path.with_name(f".{self.path.name}.part")
        with _private(part, os.O_TRUNC) as f:
            f.writelines(json.dumps(i, separators=(",", ":")) + "\n" for i in self.items)
            f.flush()
            os.fsync(f.fileno())
        part.replace(self.path)

    def __len__(self) -> int:
        return len(self.items)


def _private(path: Path, mode: int) -> IO[str]:
    """Open for writing, 0600 from the first byte: reports carry instances' last log lines,
    which no app on the host may read (the agent's folder is passable to apps)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "w")
