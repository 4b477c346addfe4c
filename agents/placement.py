"""The placer's decisions: a pure function from the fleet (desired and observed) and `now`
to the events to append. No I/O; the daemon (agents/placer.py) reads and appends.

Rules, in the order they apply:
- a host with no heartbeat for `ttl` seconds is declared lost (HostLost); its instances are
  withdrawn and placed elsewhere at once. A suspect host (no heartbeat for `suspect_after`)
  keeps what it runs but gets nothing new; only alive hosts receive placements.
- each app has a *target* release: its current release, unless that one failed and an
  earlier release was deployed, which then keeps serving.
- a release is placed only once built (BuildSucceeded: it has a slug). A failed build fails
  the release (ReleaseFailed "build failed: ..."): it is never placed. While the target
  builds, whatever runs keeps running.
- a release with a `release:` process runs it once, on one host, before any instance of
  the release is placed; a non-zero exit fails the release.
- instances of one process type spread over hosts (fewest of the group first, then least
  loaded), within each host's capacity and port range.
- rolling deploy: the old release's instances are withdrawn only once every wanted instance
  of the target is healthy (ReleaseDeployed). A target that crash-loops or is not healthy
  within `deploy_timeout` is failed (ReleaseFailed) and withdrawn; the old one stays.
"""

from __future__ import annotations

import heapq
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from agents.fleet import App, Fleet, Host, Placement
from ledger.events import NewEvent
from ledger.rules import release_to_run
from ledger.vocabulary import (
    LIVENESS_STREAM,
    RELEASE_PHASE,
    RUNNING,
    HostState,
    InstanceState,
    Liveness,
    crash_looping,
    wanted,
)


@dataclass(frozen=True)
class Settings:
    ttl: float = Liveness.ttl
    """Seconds without a heartbeat before a host is lost."""
    suspect_after: float = Liveness.suspect_after
    """Seconds without a heartbeat before a host is suspect (two missed heartbeats)."""
    deploy_timeout: float = 120.0
    """Seconds a new release's instances have to become healthy."""

    @property
    def liveness(self) -> Liveness:
        return Liveness(self.ttl, self.suspect_after)


@dataclass(frozen=True)
class Append:
    """One append the placer wants: events to a stream, at the version it decided from."""

    stream: str
    expected_version: int
    events: tuple[NewEvent, ...]


def new_instance_id(app: str, release: int, process_type: str) -> str:
    return f"{app}.{release}.{process_type}.{uuid.uuid4().hex[:12]}"


@dataclass
class _Slots:
    """Free capacity and ports of the alive hosts, for one reconcile."""

    hosts: dict[str, Host]
    load: Counter[str] = field(default_factory=Counter)
    ports: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    next_port: dict[str, int] = field(default_factory=dict)
    heap: list[tuple[int, str]] = field(default_factory=list)

    def build(self) -> None:
        self.heap = [(self.load[h], h) for h in self.hosts if self._room(h)]
        heapq.heapify(self.heap)

    def _room(self, host_id: str) -> bool:
        h = self.hosts[host_id]
        return self.load[host_id] < h.capacity and self._port(host_id) is not None

    def _port(self, host_id: str) -> int | None:
        h = self.hosts[host_id]
        port = max(self.next_port.get(host_id, h.port_min), h.port_min)
        used = self.ports[host_id]
        while port <= h.port_max and port in used:
            port += 1
        self.next_port[host_id] = port
        return port if port <= h.port_max else None

    def take(self, count: int, group: Counter[str]) -> list[tuple[str, int]]:
        """Up to `count` (host, port) slots, spreading over the hosts with the fewest of
        `group` first, then the least loaded."""
        picks: list[tuple[str, int]] = []
        holding = sum(1 for n in group.values() if n > 0)
        level = 0 if holding < len(self.heap) else min(  # some host has none: level 0
            (group[h] for _, h in self.heap), default=0)
        aside: list[tuple[int, str]] = []
        while len(picks) < count:
            if not self.heap:
                if not aside:
                    break
                level += 1
                for item in aside:
                    heapq.heappush(self.heap, item)
                aside = []
                continue
            load, host_id = heapq.heappop(self.heap)
            if load != self.load[host_id] or not self._room(host_id):
                if self._room(host_id):
                    heapq.heappush(self.heap, (self.load[host_id], host_id))
                continue
            if group[host_id] > level:
                aside.append((load, host_id))
                continue
            port = self._port(host_id)
            assert port is not None
            self.ports[host_id].add(port)
            self.load[host_id] += 1
            group[host_id] += 1
            picks.append((host_id, port))
            if self._room(host_id):
                heapq.heappush(self.heap, (self.load[host_id], host_id))
        for item in aside:
            heapq.heappush(self.heap, item)
        return picks


def decide(fleet: Fleet, now: datetime, settings: Settings = Settings(),
           new_id: Callable[[str, int, str], str] = new_instance_id) -> list[Append]:
    """Everything the placer should append now, one Append per stream. First, if the
    ledger's liveness timings are not the ones this placer runs with, it announces its own
    (LivenessSet), so that whoever judges a host reads what the placer acts on."""
    out: list[Append] = []
    liveness = settings.liveness
    if fleet.liveness != liveness or not fleet.liveness_version:
        out.append(Append(LIVENESS_STREAM, fleet.liveness_version, (NewEvent("LivenessSet", {
            "ttl": liveness.ttl, "suspect_after": liveness.suspect_after}),)))
    states = {h.host_id: h.state(now, liveness) for h in fleet.hosts.values()}
    for host_id, state in sorted(states.items()):
        if state is HostState.EXPIRED:
            host = fleet.hosts[host_id]
            age = (now - (host.last_heartbeat or host.registered_at)).total_seconds()
            out.append(Append(f"host-{host_id}", host.version, (NewEvent("HostLost", {
                "host_id": host_id,
                "reason": f"no heartbeat for {age:.0f}s (ttl {settings.ttl:g}s)"}),)))
            states[host_id] = HostState.LOST
    slots = _slots(fleet, states)
    by_app: dict[str, list[Placement]] = defaultdict(list)
    for p in fleet.placements.values():
        by_app[p.app].append(p)
    for name in sorted(set(fleet.apps) | set(by_app)):
        events = _plan_app(fleet, fleet.apps.get(name), name, by_app.get(name, []), states,
                           slots, now, settings, new_id)
        if events:
            out.append(Append(f"placement-{name}", fleet.placement_versions.get(name, 0),
                              tuple(events)))
    return out


def _slots(fleet: Fleet, states: dict[str, HostState]) -> _Slots:
    alive = {h: fleet.hosts[h] for h, s in states.items() if s is HostState.ALIVE}
    slots = _Slots(alive)
    for p in fleet.placements.values():
        slots.load[p.host_id] += 1
        slots.ports[p.host_id].add(p.port)
    for inst in fleet.instances.values():  # withdrawn but still stopping: port still taken
        if inst.state in RUNNING and inst.host_id and inst.port:
            slots.ports[inst.host_id].add(inst.port)
    slots.build()
    return slots


def _unplace(p: Placement, reason: str) -> NewEvent:
    return NewEvent("InstanceUnplaced", {"instance_id": p.instance_id, "app": p.app,
                                         "reason": reason})


def _plan_app(fleet: Fleet, app: App | None, name: str, placements: list[Placement],
              states: dict[str, HostState], slots: _Slots, now: datetime, settings: Settings,
              new_id: Callable[[str, int, str], str]) -> list[NewEvent]:
    events: list[NewEvent] = []
    live: list[Placement] = []
    for p in placements:
        if app is None:
            events.append(_unplace(p, "app deleted"))
        elif states.get(p.host_id, HostState.LOST) is HostState.LOST:
            events.append(_unplace(p, f"host {p.host_id} lost"))
        else:
            live.append(p)
    if app is None or app.current_release is None:
        return events
    target = _target(app)
    release = app.releases[target]
    if release.build.status == "failed" and target not in app.failed:
        return events + [NewEvent("ReleaseFailed", {
            "app": name, "release": target,
            "reason": f"build failed: {release.build.reason}"[:2000]})]
    mine = [p for p in live if p.release == target]
    others = [p for p in live if p.release != target]
    events += [_unplace(p, f"release {p.release} failed") for p in others
               if p.release in app.failed]
    others = [p for p in others if p.release not in app.failed]
    if release.slug is None:
        return events  # not built yet (or never will be): nothing of it is placed
    phase = [p for p in mine if p.process_type == RELEASE_PHASE]
    if _needs_phase(app, target):
        return events + _release_phase(fleet, app, target, phase, slots, new_id)
    events += [_unplace(p, "release phase finished") for p in phase]
    mine = [p for p in mine if p.process_type != RELEASE_PHASE]
    want = wanted(release.procfile, app.scale)
    for p in mine:
        if p.process_type not in want:
            events.append(_unplace(p, f"no {p.process_type} process in release {target}"))
    for ptype, count in sorted(want.items()):
        group = [p for p in mine if p.process_type == ptype]
        events += _scale_group(fleet, app, target, ptype, count, group, slots, new_id)
    if app.deployed == target:
        return events + [_unplace(p, f"release {target} serves") for p in others]
    healthy = Counter(p.process_type for p in mine
                      if fleet.instance(p.instance_id).state is InstanceState.HEALTHY)
    if all(healthy[t] >= n for t, n in want.items()):
        events.append(NewEvent("ReleaseDeployed", {"app": name, "release": target}))
        return events + [_unplace(p, f"superseded by release {target}") for p in others]
    if target not in app.failed and (reason := _failing(fleet, mine, now, settings)):
        events.append(NewEvent("ReleaseFailed", {"app": name, "release": target,
                                                 "reason": reason}))
    return events


def _target(app: App) -> int:
    """The release that should run (ledger.rules.release_to_run)."""
    assert app.current_release is not None
    return release_to_run(app.current_release, app.deployed, app.failed)


PHASE_OUTPUT = 100
"""Last lines of a failed release phase kept in its ReleaseFailed (`tally deploy` prints
them, as Heroku prints the release phase's output)."""


def _needs_phase(app: App, target: int) -> bool:
    return (RELEASE_PHASE in app.releases[target].procfile and target not in app.phase_ok
            and app.deployed != target and target not in app.failed)


def _release_phase(fleet: Fleet, app: App, target: int, phase: list[Placement],
                   slots: _Slots, new_id: Callable[[str, int, str], str]) -> list[NewEvent]:
    if not phase:
        placed = _place(app, target, RELEASE_PHASE, 1, slots, Counter(), new_id)
        return placed or _shortfall(app, target, RELEASE_PHASE, 1, 0)
    inst = fleet.instance(phase[0].instance_id)
    if inst.state is InstanceState.EXITED and inst.exit_code != 0:
        tail = " | ".join(inst.log_tail[-3:])
        code = f"code {inst.exit_code}" if inst.signal is None else f"signal {inst.signal}"
        return [NewEvent("ReleaseFailed", {
            "app": app.name, "release": target,
            "reason": f"release phase exited with {code}: {tail}"[:2000],
            "output": inst.log_tail[-PHASE_OUTPUT:]}),
            _unplace(phase[0], "release phase failed")]
    return []


def _scale_group(fleet: Fleet, app: App, target: int, ptype: str, count: int,
                 group: list[Placement], slots: _Slots,
                 new_id: Callable[[str, int, str], str]) -> list[NewEvent]:
    if len(group) > count:
        per_host = Counter(p.host_id for p in group)
        order = sorted(group, key=lambda p: (
            fleet.instance(p.instance_id).state is InstanceState.HEALTHY,
            -per_host[p.host_id], p.instance_id))
        return [_unplace(p, f"scaled to {count}") for p in order[: len(group) - count]]
    if len(group) == count:
        return []
    need = count - len(group)
    events = _place(app, target, ptype, need, slots,
                    Counter(p.host_id for p in group), new_id)
    if len(events) < need:
        events += _shortfall(app, target, ptype, count, len(group) + len(events))
    return events


def _shortfall(app: App, target: int, ptype: str, wanted: int, placed: int) -> list[NewEvent]:
    """PlacementFailed, once per distinct shortfall (not at every reconcile)."""
    reason = f"no alive host with free capacity for {wanted - placed} more"
    if app.last_failure.get((target, ptype)) == (wanted, placed, reason):
        return []
    return [NewEvent("PlacementFailed", {
        "app": app.name, "release": target, "process_type": ptype, "wanted": wanted,
        "placed": placed, "reason": reason})]


def _place(app: App, target: int, ptype: str, count: int, slots: _Slots, group: Counter[str],
           new_id: Callable[[str, int, str], str]) -> list[NewEvent]:
    return [NewEvent("InstancePlaced", {
        "instance_id": new_id(app.name, target, ptype), "app": app.name, "release": target,
        "process_type": ptype, "host_id": host_id, "port": port})
        for host_id, port in slots.take(count, group)]


def _failing(fleet: Fleet, mine: Iterable[Placement], now: datetime,
             settings: Settings) -> str | None:
    """Why the rollout of these instances has failed, or None while it may still succeed."""
    for p in mine:
        inst = fleet.instance(p.instance_id)
        if crash_looping(inst.state, inst.restarts):
            if inst.exit_code is None and inst.signal is None:  # it never started
                last = inst.log_tail[-1] if inst.log_tail else "no reason given"
                return (f"instance {p.instance_id} could not start "
                        f"({inst.restarts} tries): {last}")
            how = (f"exit code {inst.exit_code}" if inst.signal is None
                   else f"signal {inst.signal}")
            return (f"instance {p.instance_id} is crash-looping: {inst.restarts} restarts, "
                    f"last {how}")
        waited = (now - p.placed_at).total_seconds()
        if inst.state is not InstanceState.HEALTHY and waited > settings.deploy_timeout:
            return (f"instance {p.instance_id} not healthy after {waited:.0f}s "
                    f"(deploy timeout {settings.deploy_timeout:g}s)")
    return None
