"""Which host may ship which instance's log lines: the one the ledger placed it on.

The collector admits every registered host's CURVE key (ledger/curve.py: Allowed), and
keeps each sender's marks apart (agents/logs.py), so no host can silence another's lines.
This adds the placement check: a host's lines are written only for the instances placed
on it (InstancePlaced) and the detached runs the API started there (RunStarted, logged as
`<app>.run.<N>`). A compromised host can then write only under the apps it runs, as it
could anyway through those apps; it cannot add a line to another host's instance. The
control plane's keys (balancers' access logs, `router.<app>...`) are trusted as before.

Placements are read from the ledger as they come (from a position, only these two event
types); an instance not known yet is looked up again at most every `refresh_s` (its
lines are refused until then: the shipper sends them again, nothing is lost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("tally.collector")


def placed_log(event_type: str, data: Mapping[str, Any]) -> tuple[str, str] | None:
    """(log name, host) an event places, if it places one."""
    if event_type == "InstancePlaced" and data.get("host_id"):
        return str(data["instance_id"]), str(data["host_id"])
    if event_type == "RunStarted":  # a detached run's log name (an attached one has none)
        return f"{data['app']}.run.{data['number']}", str(data["host_id"])
    return None


class Placed:
    """`admits(sender, log name)` for the collector."""

    def __init__(self, dsn: str, trusted: set[str], hosts: Callable[[], Mapping[str, bytes]],
                 refresh_s: float = 1.0) -> None:
        self.dsn, self.trusted, self.hosts, self.refresh_s = dsn, trusted, hosts, refresh_s
        self.where: dict[str, set[str]] = {}
        """Log name -> the hosts it was placed on (a run's number may be reused after a
        restore; an instance is placed once)."""
        self._position = 0
        self._refreshed = -refresh_s
        self._ledger: Any = None
        self._refused: set[tuple[str, str]] = set()
        self._keys: dict[str, str] = {}
        """Key -> host, made again when a key is not in it (one lookup a message, not a
        walk over every host); a host's key is its latest registration's."""

    def host_of(self, key: str) -> str | None:
        if key not in self._keys:
            self._keys = {k.decode(): h for h, k in self.hosts().items()}
        host = self._keys.get(key)
        return host if host is not None and self.hosts().get(host, b"").decode() == key \
            else None

    def admits(self, sender: str, name: str) -> bool:
        if sender in self.trusted:
            return True
        host = self.host_of(sender)
        if host is None:
            return False
        if host not in self.where.get(name, ()) and (time.monotonic() - self._refreshed
                                                     >= self.refresh_s):
            self.refresh()
        if host in self.where.get(name, ()):
            return True
        if (host, name) not in self._refused:  # said once
            self._refused.add((host, name))
            log.warning("refused lines of %s from host %s: not placed there", name, host)
        return False

    def refresh(self) -> None:
        from ledger.errors import LedgerError
        from ledger.store import Ledger

        self._refreshed = time.monotonic()
        try:
            if self._ledger is None:
                self._ledger = Ledger(self.dsn, retry_deadline=1.0, notify=False,
                                      application_name="tally-collector-placed")
            self._ledger.sequence()  # a host's first lines come right after its placement
            while batch := self._ledger.read_all(self._position, limit=5000,
                                                 categories=["placement", "app"],
                                                 types=["InstancePlaced", "RunStarted"]):
                for e in batch:
                    if found := placed_log(e.type, e.data):
                        self.where.setdefault(found[0], set()).add(found[1])
                self._position = batch[-1].position or self._position
        except LedgerError as exc:
            log.warning("placements not read (the ledger is away): %s", exc)
