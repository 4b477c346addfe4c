"""The add-ons' reaper: retries the drops that failed after an add-on was destroyed.

The API drops an add-on's database or Redis right after recording AddonDestroyed, and
records AddonDropped once it is gone. If that drop fails (its final backup failed, the
apps' cluster was away...), the ledger says destroyed and the service is left, with
credentials that may still open it, and a new add-on of that name waits for it
(api/decide.py). This daemon reads the ledger for such add-ons ("undropped":
ledger.rules.undropped_after over every app's stream) and drops each again, through the
same code as the API (its final backup first), then records AddonDropped. One failure
does not stop the others; each add-on's retries back off (doubling up to `max_wait`).

It runs on the API host, beside the services it drops (`tally serve addons`; `tally up`
starts it). It leaves alone an AddonDestroyed younger than `grace`: the API is dropping
it right then, and a user may re-create the add-on as soon as it has. Killed at any
point, it resumes from the ledger: a drop is idempotent (nothing there, nothing done).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger import Ledger, NewEvent
from ledger.events import RecordedEvent
from ledger.rules import ADDON_DROP_EVENTS, undropped_after

log = logging.getLogger("tally.addons")
Drop = Callable[[str, str], None]
"""Drops the app's add-on of a kind (kind, app); raises if it cannot."""


@dataclass
class Undropped:
    app: str
    kind: str
    destroyed_at: datetime
    version: int
    """The app stream's version at its AddonDestroyed."""


def undropped(events: Iterable[RecordedEvent],
              known: dict[str, Undropped] | None = None) -> dict[str, Undropped]:
    """Fold app streams' add-on events (in ledger order) into the add-ons destroyed and not
    dropped, by add-on name."""
    out = dict(known or {})
    for e in events:
        if e.type not in ADDON_DROP_EVENTS:
            continue
        app = e.stream.removeprefix("app-")
        mine = {n: u.kind for n, u in out.items() if u.app == app}
        after = undropped_after(mine, e.type, e.data)
        for name in set(mine) - set(after):
            del out[name]
        for name, kind in after.items():
            if name not in out:
                at = e.recorded_at or datetime.min.replace(tzinfo=UTC)
                out[name] = Undropped(app, kind, at, e.version)
    return out


@dataclass
class Reaper:
    ledger: Ledger
    drop: Drop
    grace: timedelta = timedelta(seconds=60)
    max_wait: timedelta = timedelta(minutes=10)
    position: int = 0
    pending: dict[str, Undropped] = field(default_factory=dict)
    next_try: dict[str, tuple[datetime, timedelta]] = field(default_factory=dict)

    def catch_up(self) -> None:
        self.ledger.sequence()  # as the placer does: not waiting for a relay to move the head
        while batch := self.ledger.read_all(self.position, categories=["app"],
                                            types=list(ADDON_DROP_EVENTS), limit=1000):
            self.pending = undropped(batch, self.pending)
            self.position = batch[-1].position or self.position

    def tick(self, now: datetime) -> list[str]:
        """One round: the add-ons dropped now (each recorded AddonDropped)."""
        self.catch_up()
        done = []
        for name, u in sorted(self.pending.items()):
            due, wait = self.next_try.get(name, (u.destroyed_at + self.grace, self.grace))
            if now < due:
                continue
            if name not in undropped(self.ledger.read_stream(f"app-{u.app}")):
                continue  # dropped meanwhile (the API); the next catch-up sees it
            try:
                self.drop(u.kind, u.app)
            except Exception as exc:  # any failure: logged, retried later
                wait = min(wait * 2, self.max_wait)
                self.next_try[name] = (now + wait, wait)
                log.warning("dropping %s failed (again in %ss): %s", name,
                            int(wait.total_seconds()), exc)
                continue
            self.ledger.append(f"app-{u.app}", [NewEvent(
                "AddonDropped", {"app": u.app, "addon": name, "kind": u.kind, "by": "reaper"},
                {"actor": "addons-reaper"})])
            self.next_try.pop(name, None)
            log.info("dropped %s (destroyed at %s)", name, u.destroyed_at.isoformat())
            done.append(name)
        return done
