"""`tally why APP`: why an app is, or is not, serving, in plain sentences that cite the
ledger positions they stand on.

Pure: it takes the events (the app's stream, its placement stream, its instances' streams,
the hosts' streams and their last heartbeats, the placer's liveness timings) and the
reader's `now`, projects them in
memory with the very projectors that build the views, and reads the rows. The walk follows
the path a request takes: app -> release -> scale -> maintenance -> placements -> hosts ->
instances -> routes; the first broken link is the answer, the rest is context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.events import RecordedEvent
from ledger.vocabulary import (
    WEB,
    HostState,
    InstanceState,
    Liveness,
    ReleaseStatus,
    crash_looping,
    liveness_of,
    wanted,
)
from projectors import apps, hosts, instances, placements, routes
from projectors.hosts import host_state
from projectors.projector import project
from projectors.tables import Row, Tables

WHY_PROJECTORS = (apps.PROJECTOR, hosts.PROJECTOR, placements.PROJECTOR, instances.PROJECTOR,
                  routes.PROJECTOR)


@dataclass(frozen=True)
class Finding:
    """One sentence and the positions of the events it rests on."""

    text: str
    positions: tuple[int, ...] = ()
    problem: bool = True

    def render(self) -> str:
        if not self.positions:
            return self.text
        cited = ", ".join(str(p) for p in sorted(set(self.positions)))
        return f"{self.text} [position{'s' if len(set(self.positions)) > 1 else ''} {cited}]"


@dataclass(frozen=True)
class Explanation:
    app: str
    serving: bool
    head: int
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def summary(self) -> str:
        problems = [f for f in self.findings if f.problem]
        if self.serving:
            state = "serving, but degraded" if problems else "serving"
        else:
            state = "NOT serving"
        return f"{self.app} is {state} (as of ledger position {self.head})."

    def lines(self) -> list[str]:
        return [self.summary, *(("- " if f.problem else "  ") + f.render()
                                for f in self.findings)]

    def as_dict(self) -> dict[str, Any]:
        return {"app": self.app, "serving": self.serving, "head": self.head,
                "summary": self.summary,
                "findings": [{"text": f.text, "positions": sorted(set(f.positions)),
                              "problem": f.problem} for f in self.findings]}


def explain(app: str, events: Sequence[RecordedEvent], now: datetime) -> Explanation:
    """Why `app` is or is not serving, from `events` (any order; unsequenced ones are
    ignored), as of `now`."""
    events = sorted((e for e in events if e.position is not None), key=_position)
    head = _position(events[-1]) if events else 0
    views = project(WHY_PROJECTORS, events)
    findings: list[Finding] = []
    serving = _walk(app, events, views, now, liveness_of(events), findings)
    return Explanation(app, serving, head, tuple(findings))


def _position(e: RecordedEvent) -> int:
    assert e.position is not None, "why reads sequenced events only"
    return e.position


def _walk(app: str, events: Sequence[RecordedEvent], v: dict[str, Tables], now: datetime,
          liveness: Liveness, out: list[Finding]) -> bool:
    row = v["apps"].get("apps", app)
    if row is None:
        deleted = _last(events, "AppDeleted", lambda e: e.data["name"] == app)
        if deleted is not None:
            out.append(Finding(f"{app} was deleted.", (_position(deleted),)))
        else:
            out.append(Finding(f"There is no app named {app} in the ledger (never created)."))
        return False
    if row["current_release"] is None:
        out.append(Finding(f"{app} has no release yet: it was created but no code was "
                           "pushed (no ReleaseCreated).", (row["created_position"],)))
        return False
    release = _serving_release(app, row, v, out)
    if release is None:
        return False
    number, rel_pos = release["release"], release["position"]
    if WEB not in release["procfile"]:
        kinds = ", ".join(sorted(release["procfile"])) or "none"
        out.append(Finding(f"Release v{number} has no `web` process type in its Procfile "
                           f"(only: {kinds}), so nothing can answer HTTP.", (rel_pos,)))
        return False
    want = wanted(release["procfile"], row["scale"]).get(WEB, 0)
    if want == 0:
        cited = (row["scale_position"],) if row["scale_position"] else (row["created_position"],)
        how = "was scaled to zero" if row["scale_position"] else "was never scaled up"
        out.append(Finding(f"{app} {how}: 0 web instances are wanted "
                           f"(`tally scale -a {app} web=1`).", cited))
        return False
    if row["maintenance"]:
        out.append(Finding(f"{app} is in maintenance mode: balancers answer 503 with the "
                           "maintenance page (instances keep running).",
                           (row["maintenance_position"],)))
    placed = [p for p in v["placements"].rows["placements"].values()
              if p["app"] == app and p["release"] == number and p["process_type"] == WEB]
    basis = row["scale_position"] or rel_pos  # what says how many are wanted
    _placements(app, number, want, basis, placed, events, v, out)
    for p in sorted(placed, key=lambda p: p["instance_id"]):
        _instance(p, v, now, liveness, out)
    return _routes(app, v, out) and not row["maintenance"]


def _serving_release(app: str, row: Row, v: dict[str, Tables], out: list[Finding]
                     ) -> Row | None:
    """The release that should take traffic: the current one (the placer's target), unless
    its rollout failed, then the deployed one."""
    target = v["apps"].get("releases", app, row["current_release"])
    assert target is not None
    n, deployed = target["release"], row["deployed_release"]
    out.append(Finding(f"Current release is v{n} (bundle {target['bundle_digest'][:12]}), "
                       f"{target['status']}.", (target["position"],), problem=False))
    if target["status"] == ReleaseStatus.FAILED:
        said = f"Release v{n} failed to deploy: {target['failure_reason']}."
        if deployed is None:  # the placer keeps it placed: nothing older to serve instead
            out.append(Finding(said + " No earlier release was ever deployed to fall back "
                               "on.", (target["status_position"],)))
            return target
        out.append(Finding(said + f" v{deployed} keeps serving.",
                           (target["status_position"], row["deployed_position"])))
        return v["apps"].get("releases", app, deployed)
    if target["status"] == ReleaseStatus.PENDING and deployed is not None and deployed != n:
        out.append(Finding(f"v{n} is rolling out; v{deployed} serves meanwhile.",
                           (target["position"], row["deployed_position"]), problem=False))
    return target


def _placements(app: str, number: int, wanted: int, basis: int, placed: list[Row],
                events: Sequence[RecordedEvent], v: dict[str, Tables],
                out: list[Finding]) -> None:
    cited = tuple(p["position"] for p in placed) or (basis,)
    if len(placed) >= wanted:
        out.append(Finding(f"{len(placed)} of {wanted} wanted web instances of v{number} are "
                           "placed.", cited, problem=False))
        return
    failed = _last(events, "PlacementFailed",
                   lambda e: e.data["app"] == app and e.data["release"] == number
                   and e.data["process_type"] == WEB)
    text = (f"Only {len(placed)} of {wanted} wanted web instances of v{number} are placed: "
            "the rest are pending.")
    if failed is not None:
        text += f" The placer said: {failed.data['reason']}."
        cited += (failed.position,)
    out.append(Finding(text + _fleet(v), cited))


def _fleet(v: dict[str, Tables]) -> str:
    fleet = list(v["hosts"].all("hosts"))
    if not fleet:
        return " No host has registered."
    parts = []
    for h in sorted(fleet, key=lambda h: h["host_id"]):
        if h["state"] == HostState.LOST:
            parts.append(f"{h['host_id']} lost")
        else:
            used = h["running_instances"] if h["running_instances"] is not None else "?"
            parts.append(f"{h['host_id']} {used}/{h['capacity']} slots used")
    return " Hosts: " + ", ".join(parts) + "."


def _instance(p: Row, v: dict[str, Tables], now: datetime, liveness: Liveness,
              out: list[Finding]) -> None:
    iid, host_id = p["instance_id"], p["host_id"]
    where = f"instance {iid} on {host_id}:{p['port']}"
    host = v["hosts"].get("hosts", host_id)
    if host is None:
        out.append(Finding(f"{where}: host {host_id} never registered.", (p["position"],)))
        return
    state = host_state(host, now, liveness)
    if state is HostState.LOST:
        reason = f" ({host['lost_reason']})" if host["lost_reason"] else ""
        out.append(Finding(f"{where}: host {host_id} was declared lost{reason}; the placer has "
                           "not moved the instance yet.", (p["position"], host["lost_position"])))
        return
    if state in (HostState.SUSPECT, HostState.EXPIRED):
        last = host["last_heartbeat"] or host["registered_at"]
        ago = int((now - last).total_seconds())
        cited = (host["heartbeat_position"] or host["registered_position"],)
        text = f"{where}: host {host_id} is suspect: no heartbeat for {ago}s."
        if state is HostState.EXPIRED:
            text += f" Past the TTL ({liveness.ttl:g}s): the placer will declare it lost."
        out.append(Finding(text, cited))
    inst = v["instances"].get("instances", iid)
    if inst is None or inst["state"] == InstanceState.PLACED:
        out.append(Finding(f"{where} was placed but has not started yet (the host agent has "
                           "not reported it).", (p["position"],)))
    elif inst["state"] == InstanceState.STARTED and crash_looping(inst["state"],
                                                                   inst["restarts"]):
        out.append(Finding(_exited(where, inst), (inst["state_position"],)))
    elif inst["state"] == InstanceState.STARTED:
        out.append(Finding(f"{where} started (pid {inst['pid']}) but has not passed its health "
                           "check yet.", (inst["state_position"],)))
    elif inst["state"] == InstanceState.EXITED:
        out.append(Finding(_exited(where, inst), (inst["state_position"],)))
    elif inst["state"] == InstanceState.STOPPED:
        out.append(Finding(f"{where} was stopped and not started again.",
                           (inst["state_position"],)))
    else:
        out.append(Finding(f"{where} is healthy.", (inst["state_position"],), problem=False))


def _exited(where: str, inst: Row) -> str:
    how = (f"exit code {inst['exit_code']}" if inst["exit_code"] is not None
           else f"signal {inst['signal']}" if inst["signal"] is not None else "no exit code")
    if crash_looping(inst["state"], inst["restarts"]):
        text = f"{where} is crash-looping: it exited with {how} after {inst['restarts']} restarts."
    else:
        text = f"{where} exited with {how}."
    tail = [line for line in inst["log_tail"] if line.strip()][-3:]
    if tail:
        text += " Last log lines: " + " | ".join(tail)
    return text


def _routes(app: str, v: dict[str, Tables], out: list[Finding]) -> bool:
    mine = sorted(v["routes"].by("routes", app), key=lambda r: r["hostname"])
    if not mine:
        out.append(Finding(f"No route points at {app}."))
        return False
    names = ", ".join(r["hostname"] for r in mine)
    cited = tuple(r["version"] for r in mine)
    backends = sorted({b for r in mine for b in r["backends"]})
    if not backends:
        label = "Route" if len(mine) == 1 else "Routes"
        out.append(Finding(f"{label} {names}: no healthy backend, balancers answer 503.",
                           cited))
        return False
    out.append(Finding(f"Routes {names} -> {', '.join(backends)}.", cited, problem=False))
    return True


def _last(events: Sequence[RecordedEvent], type_: str, match: object) -> RecordedEvent | None:
    for e in reversed(events):
        if e.type == type_ and match(e):  # type: ignore[operator]
            return e
    return None
