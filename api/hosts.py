"""What each host should run, folded from the ledger's `placement-*` streams: the API's
answer to an agent asking for its desired state.

Why a fold here rather than the placements view: an agent learns its desired version from
every heartbeat reply, so the version must cost no query, and it must be exactly the
position the answer was read at (a view lags a little behind, by its own checkpoint). The
fold is pure and incremental (each API process applies what follows its position, at most
every `hosts_fresh_s`); it holds one small record per placed instance, so 10,000 hosts
cost a few megabytes. A host's version is the position of the last placement event that
touched it or one of the apps placed on it (a rollout's ReleaseDeployed/ReleaseFailed), or
a one-off run the API started or ended there: it only grows, so `?after=V` answers
"nothing new" from memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ledger.events import RecordedEvent
from ledger.rules import DESIRED_EVENTS, ROLLOUT_EVENTS, release_to_run, rollout_after

CATEGORIES = ["placement", "app"]
TYPES = list(DESIRED_EVENTS)
"""What the fold reads: placements and rollouts, and one-off runs the API sent to a host."""


@dataclass(frozen=True)
class Placed:
    instance_id: str
    app: str
    release: int
    process_type: str
    port: int


@dataclass
class Placements:
    """Per host, its placed instances; per app, its rollout facts; and their versions."""

    hosts: dict[str, dict[str, Placed]] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)
    """instance id -> the host it is or was last placed on: the one whose agent may
    report it (it may still be stopping there once unplaced)."""
    host_moved: dict[str, int] = field(default_factory=dict)
    app_moved: dict[str, int] = field(default_factory=dict)
    runs: dict[str, dict[tuple[str, int], int]] = field(default_factory=dict)
    """host -> (app, run number) -> release, of runs started there and not ended."""
    deployed: dict[str, int | None] = field(default_factory=dict)
    failed: dict[str, dict[int, str]] = field(default_factory=dict)
    """app -> its rollout (ledger.rules.rollout_after), as the placer's fleet holds it."""
    position: int = 0

    def apply(self, events: Iterable[RecordedEvent]) -> None:
        for e in events:
            d, at = e.data, e.position or self.position
            app: str = d.get("app") or ""
            if e.type == "InstancePlaced":
                host = d["host_id"]
                self.hosts.setdefault(host, {})[d["instance_id"]] = Placed(
                    d["instance_id"], app, d["release"], d["process_type"], d["port"])
                self.where[d["instance_id"]] = host
                self.host_moved[host] = at
            elif e.type == "InstanceUnplaced":
                host = self.where.get(d["instance_id"])  # kept: it may still run there
                if host is not None:
                    self.hosts.get(host, {}).pop(d["instance_id"], None)
                    self.host_moved[host] = at
            elif e.type == "RunStarted":
                self.runs.setdefault(d["host_id"], {})[(app, d["number"])] = d["release"]
                self.host_moved[d["host_id"]] = at
            elif e.type == "RunEnded":
                for host, started in self.runs.items():
                    if started.pop((app, d["number"]), None) is not None:
                        self.host_moved[host] = at
            elif e.type in ROLLOUT_EVENTS:
                self.deployed[app], self.failed[app] = rollout_after(
                    self.deployed.get(app), self.failed.get(app, {}), e.type, d)
            if app and e.type not in ("RunStarted", "RunEnded"):
                self.app_moved[app] = at
            self.position = max(self.position, at)

    def shown(self, app: str, current: int | None, needed: set[int]) -> set[int]:
        """The releases of an app whose procfile and config a host is sent: those placed
        there or running a one-off there (`needed`), and if any, the release the placer
        runs (ledger.rules.release_to_run: the agent confines the app's network by it)."""
        if not needed or current is None:
            return set(needed)
        return needed | {release_to_run(current, self.deployed.get(app),
                                        self.failed.get(app, {}))}

    def placed_here(self, host_id: str, app: str, release: int | None = None) -> bool:
        """Whether an instance of the app (of that release) is placed on the host."""
        return any(p.app == app and release in (None, p.release)
                   for p in self.hosts.get(host_id, {}).values())

    def run_releases(self, host_id: str) -> dict[str, set[int]]:
        """app -> releases of the one-off runs going on on this host."""
        out: dict[str, set[int]] = {}
        for (app, _), release in self.runs.get(host_id, {}).items():
            out.setdefault(app, set()).add(release)
        return out

    def of(self, host_id: str) -> list[Placed]:
        return sorted(self.hosts.get(host_id, {}).values(), key=lambda p: p.instance_id)

    def version(self, host_id: str) -> int:
        """Where the host's desired state last moved (0: never placed on)."""
        apps = {p.app for p in self.hosts.get(host_id, {}).values()}
        return max([self.host_moved.get(host_id, 0),
                    *(self.app_moved.get(a, 0) for a in apps)])
