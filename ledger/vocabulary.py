"""The platform's words and the rules that must read the same everywhere: instance, release
and host states, when a host is alive, how a scale change folds, what a process type runs
by default, when an instance is crash-looping.

A leaf module (it imports only the event values, `ledger.events`): the API, the agents
and the projectors all import it, so `tally why` and the placer cannot disagree. The
states are `str` enums: a value compares equal to, and is stored in JSON and the views
as, its plain string.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from ledger.events import RecordedEvent


class InstanceState(StrEnum):
    """An instance as the agents report it (InstanceStarted/Healthy/Exited/Stopped)."""

    PLACED = "placed"
    """Placed by the placer, not reported by its host's agent yet."""
    STARTED = "started"
    HEALTHY = "healthy"
    EXITED = "exited"
    STOPPED = "stopped"


RUNNING = frozenset({InstanceState.STARTED, InstanceState.HEALTHY})
"""States in which an instance's process exists (and holds its port)."""


class ReleaseStatus(StrEnum):
    """A release's rollout: pending until ReleaseDeployed or ReleaseFailed; a deployed
    release becomes superseded when a later one is deployed."""

    PENDING = "pending"
    DEPLOYED = "deployed"
    SUPERSEDED = "superseded"
    FAILED = "failed"


class HostState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    """Missed heartbeats: keeps what it runs, gets nothing new."""
    EXPIRED = "expired"
    """Silent past the TTL: the placer declares it lost at its next reconcile."""
    LOST = "lost"
    """HostLost was appended: its instances are placed elsewhere."""


@dataclass(frozen=True)
class Liveness:
    """How long a host may stay silent. The placer announces the values it runs with in a
    `LivenessSet` event (stream `placer-liveness`) and everyone who judges a host (`why`,
    `GET /hosts`, `tally run`) folds that event: one rule, one set of timings."""

    ttl: float = 15.0
    """Seconds without a heartbeat before a host is lost."""
    suspect_after: float = 5.0
    """Seconds without a heartbeat before a host is suspect (two missed heartbeats)."""

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after <= self.ttl:
            raise ValueError(f"suspect_after ({self.suspect_after:g}s) must be above 0 and "
                             f"at most the ttl ({self.ttl:g}s)")


LIVENESS_STREAM = "placer-liveness"


def liveness_of(events: Iterable[RecordedEvent]) -> Liveness:
    """The timings the placer last announced (the last LivenessSet of its stream among
    `events`), else the defaults."""
    out = Liveness()
    for e in events:
        if e.type == "LivenessSet" and e.stream == LIVENESS_STREAM:
            out = Liveness(e.data["ttl"], e.data["suspect_after"])
    return out


def host_state(lost: bool, last_seen: datetime | None, now: datetime,
               liveness: Liveness = Liveness()) -> HostState:
    """The one liveness rule. `last_seen`: the host's last heartbeat, else its
    registration; None (never heard of) reads as expired."""
    if lost:
        return HostState.LOST
    if last_seen is None:
        return HostState.EXPIRED
    age = (now - last_seen).total_seconds()
    if age > liveness.ttl:
        return HostState.EXPIRED
    return HostState.SUSPECT if age > liveness.suspect_after else HostState.ALIVE


def fold_scale(current: Mapping[str, int], changed: Mapping[str, int]) -> dict[str, int]:
    """Apply a ScaleChanged: its `scale` is the app's whole desired scale (every process
    type scaled so far), so it replaces the one before."""
    del current
    return dict(changed)


WEB = "web"
"""The process type that receives HTTP traffic."""
RELEASE_PHASE = "release"
"""The Procfile process type run once, to completion, before a release takes traffic."""


def default_scale(process_type: str) -> int:
    """Instances of a process type never scaled: `web` runs one, as on Heroku; others none."""
    return 1 if process_type == WEB else 0


def wanted(procfile: Mapping[str, str], scale: Mapping[str, int]) -> dict[str, int]:
    """Instances wanted per long-running process type of a release (release phase aside);
    types wanted at 0 are left out."""
    out = {t: scale.get(t, default_scale(t)) for t in procfile if t != RELEASE_PHASE}
    return {t: n for t, n in out.items() if n > 0}


CRASH_LOOP_RESTARTS = 3
"""Restarts after which an instance that is not healthy is crash-looping: the placer fails
its rollout, `why` says so."""


def crash_looping(state: str, restarts: int) -> bool:
    return restarts >= CRASH_LOOP_RESTARTS and state != InstanceState.HEALTHY
