"""The placer daemon (`tally serve placer`): fold the ledger, decide, append, repeat.

Level-triggered: every round reads what follows its checkpoint, asks the pure core
(agents/placement.py) what to append, and appends each stream's events with the version
it decided from. Two placers may run at once: the slower one gets a VersionConflict,
re-reads, and finds nothing left to do, so an instance is never placed twice. A relay
wake-up starts a round early; the timer starts one anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from agents.fleet import CATEGORIES, Fleet
from agents.loop import every_wakeup
from agents.placement import Settings, decide
from ledger import Ledger, VersionConflict
from ledger.batch import Checked, append_checked
from ledger.events import RecordedEvent

log = logging.getLogger("tally.placer")
PAGE = 5000
OWN_WAIT_S = 2.0
"""How long a round waits for the sequencer to place the previous round's events."""
HEARTBEAT = "heartbeat"
LIVENESS_EVERY_S = 0.5
"""A round whose catch-up folded nothing but heartbeats decides only if the last decision
is older than this. Heartbeats bear on decisions only through hosts' liveness, which this
judges often enough (a host is declared lost at most this late past its TTL); without it,
the ledger's moves under 2,000 heartbeats a second made every relay wake-up a decision
over every host, a quarter of a core at 5,000 hosts."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def catch_up(ledger: Ledger, fleet: Fleet, categories: list[str] = CATEGORIES,
             sequence: bool = True) -> None:
    """Fold every event past the fleet's checkpoint (sequencing committed ones first, so the
    placer never depends on a relay being up; readers without the writer role skip that).

    Heartbeats are most of the ledger (2,000 a second for 10,000 hosts) and the fold needs
    only when each host was last heard of: they are read as (position, stream, time), the
    newest per host in each page, with no payload to decode, and folded in ledger order
    among the other events (a heartbeat after a HostLost brings the host back, one before
    it does not)."""
    head = ledger.sequence() if sequence else ledger.head()
    others = [c for c in categories if c != HEARTBEAT]
    while True:
        page = ledger.read_all(fleet.position, limit=PAGE, upto=head,
                               categories=others) if others else []
        upto = page[-1].position or head if len(page) == PAGE else head
        if HEARTBEAT in categories:
            beats = [_heard(p, stream, at) for p, stream, at in
                     ledger.last_per_stream(HEARTBEAT, fleet.position, upto)]
            page = sorted(page + beats, key=lambda e: e.position or 0)
        fleet.apply_all(page)
        fleet.position = max(fleet.position, upto)
        if upto >= head:
            return


def _heard(position: int, stream: str, at: datetime) -> RecordedEvent:
    """A host's newest heartbeat of a page, as the fold reads it (no payload but its host)."""
    return RecordedEvent(position, 0, stream, 0, "HostHeartbeat",
                         {"host_id": stream.removeprefix(f"{HEARTBEAT}-")}, {}, at)


class Placer:
    def __init__(self, ledger: Ledger, settings: Settings | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.ledger = ledger
        self.settings = settings or Settings()
        self.clock = clock
        self.fleet = Fleet()
        self.conflicts = 0
        self.mine: int | None = None
        """The id of the last event this placer appended while its fold has not read it."""
        self.decided = float("-inf")
        """When (monotonic) the last round decided."""

    def reconcile(self) -> int:
        """One round: catch up (with its own last appends), decide, append. Returns the
        number of appends that landed."""
        before = self.fleet.last_id
        self._catch_up()
        now = time.monotonic()
        if self.fleet.last_id == before and now - self.decided < LIVENESS_EVERY_S:
            return 0  # only heartbeats since the last decision, and that was just now
        self.decided = now
        appends = decide(self.fleet, self.clock(), self.settings)
        # One transaction for the round (one commit, not one per stream), unless a stream
        # moved meanwhile: then one by one, to keep those that still apply.
        if len(appends) > 1 and (ids := append_checked(self.ledger, [
                Checked(a.stream, a.expected_version, a.events) for a in appends])):
            self.mine = max(ids)
            for a in appends:
                for e in a.events:
                    log.info("%s %s", e.type, _brief(e.data))
            return len(appends)
        landed = 0
        for a in appends:
            try:
                done = self.ledger.append(a.stream, list(a.events),
                                          expected_version=a.expected_version)
                self.mine = max(done.event_ids)
            except VersionConflict as exc:
                self.conflicts += 1
                log.info("another placer moved %s first (%s): re-reading", a.stream, exc)
                continue
            landed += 1
            for e in a.events:
                log.info("%s %s", e.type, _brief(e.data))
        return landed

    def _catch_up(self) -> None:
        """Fold what follows the checkpoint, until it includes what this placer appended
        last (within OWN_WAIT_S). A round right after another (a wake-up) could otherwise
        read before the sequencer placed the last round's events, decide the same again and
        see every append of it refused as a conflict."""
        deadline = time.monotonic() + OWN_WAIT_S
        while True:
            catch_up(self.ledger, self.fleet)
            if self.mine is None or self.fleet.last_id >= self.mine:
                self.mine = None
                return
            if time.monotonic() > deadline:
                log.warning("own appends (to event %d) not sequenced within %.0fs: deciding "
                            "without them", self.mine, OWN_WAIT_S)
                return
            time.sleep(0.005)

    def run(self, stop: threading.Event, relays: list[str] | tuple[str, ...] = (),
            interval: float = 1.0) -> None:
        """Reconcile until `stop` is set: after each wake-up, and every `interval` seconds."""
        every_wakeup(self.reconcile, stop, relays, interval, log)


def _brief(data: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in data.items() if k != "log_tail")
