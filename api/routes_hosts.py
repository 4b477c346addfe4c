"""Endpoints the host agents talk to with host-scoped tokens: registering their host,
heartbeats (answered at once, appended together: api/heartbeats.py), their desired state,
their instances' events and stats, how their one-off runs ended; and the fleet's hosts as
admins list them. With these a fleet host needs no ledger credentials at all (DESIGN.md,
"Trust boundaries"): an agent token opens only its own host's routes."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask.typing import ResponseReturnValue

from agents.stats import Sample
from api import beats, schemas
from api.auth import require_host, require_role
from api.errors import Conflict, Forbidden, NotFound, Unprocessable
from api.hosts import Placements
from api.relay import run_channel
from api.state import AppState
from api.web import body, json_body, query, reply, route, services, who
from ledger import NO_STREAM, NewEvent, VersionConflict
from ledger.builds import build_stream
from ledger.builds import fold as fold_build
from ledger.tickets import host_key


@route("/hosts", response=schemas.Rows, tag="fleet", errors=(401, 403))
def list_hosts() -> ResponseReturnValue:
    """The fleet, from the hosts view (admins only)."""
    require_role(who(), "admin")
    return reply(schemas.Rows, {"items": services().hosts()})


@route("/hosts/<host_id>", "PUT", body=schemas.HostRegister, response=schemas.HostRegistered,
       tag="agents", errors=(400, 401, 403, 409, 422))
def register_host(host_id: str) -> ResponseReturnValue:
    """An agent registers its host: address, port range, capacity (and its run endpoint,
    memory). A re-registration keeps what it does not name; the first must name the
    address, port range and capacity. The answer hands the agent its host's key of run
    tickets (ledger/tickets.py), which only this host's token gets, and the API's CURVE
    key, the one its run socket is to admit."""
    require_host(who(), host_id)
    stream = f"host-{host_id}"
    history = services().ledger.read_stream(stream)
    before = next((e.data for e in reversed(history) if e.type == "HostRegistered"), {})
    data = {**before, **body(schemas.HostRegister), "host_id": host_id}
    missing = [f for f in ("address", "port_min", "port_max", "capacity") if f not in data]
    if missing:
        raise Unprocessable(f"a host's first registration names {', '.join(missing)}",
                            {f: ["required"] for f in missing})
    if data["port_min"] > data["port_max"]:
        raise Unprocessable("port_min must not exceed port_max", {"port_min": ["> port_max"]})
    try:
        result = services().append(stream, [NewEvent("HostRegistered", data)],
                                   len(history) or NO_STREAM, who())
    except VersionConflict as exc:
        raise Conflict(f"host {host_id} changed meanwhile: register again") from exc
    master = services().settings.run_key
    return reply(schemas.HostRegistered, {
        "stream": stream, "version": result.version,
        "run_key": host_key(master, host_id).hex() if master else None,
        "run_channel_key": run_channel(master).public.decode() if master else None})


@route("/hosts/<host_id>/heartbeats", "POST", body=schemas.Heartbeat, status=202,
       response=schemas.HeartbeatAccepted, tag="agents", errors=(400, 401, 403, 422),
       revocation_later=True)
def heartbeat(host_id: str) -> ResponseReturnValue:
    """An agent says its host is alive: answered at once, appended with the others of the
    same tenth of a second (api/heartbeats.py). The reply carries the version of the
    host's desired state, so an agent learns of a change within a heartbeat. The hottest
    route (2,000/s for 10,000 hosts): no ledger round trip of its own; a revoked token's
    heartbeats are dropped with their batch. Plain ones are answered before Flask
    (api/beats.py); this answers the rest."""
    caller = who()
    require_host(caller, host_id)
    beat = beats.plain(json_body())
    desired = beats.accept(services(), caller, host_id,
                           beat if beat is not None else body(schemas.Heartbeat))
    return reply(schemas.HeartbeatAccepted, {"accepted": True, "desired": desired}, 202)


@route("/hosts/<host_id>/placements", response=schemas.Rows, tag="agents",
       errors=(401, 403))
def host_placements(host_id: str) -> ResponseReturnValue:
    """What the placer wants on this host (the agent's desired state)."""
    require_host(who(), host_id)
    return reply(schemas.Rows, {"items": services().views.placements(host_id=host_id)})


@route("/instances/<instance_id>/events", "POST", body=schemas.InstanceEvent,
       response=schemas.Appended, tag="agents", errors=(400, 401, 403, 422))
def instance_event(instance_id: str) -> ResponseReturnValue:
    """An agent reports what one of its instances did (started, healthy, exited, stopped):
    only instances placed on its host, or still running there."""
    caller = who()
    req = body(schemas.InstanceEvent)
    data = {**req["data"], "instance_id": instance_id}
    if caller.role == "agent":
        host = caller.host_id
        # Placed here per this process's placements fold (the one the agent read its
        # desired state from), or still running here per the instances view.
        if not host or (services().placements().where.get(instance_id) != host
                        and not services().views.on_host(instance_id, host)):
            raise Forbidden(f"instance {instance_id} is not placed on host {host}")
        data["host_id"] = host
    else:
        require_role(caller, "admin")
    # The agent's key, scoped to the caller: one host cannot collide with another's.
    key = f"{caller.name}/{req['key']}" if req["key"] else None
    return _append(f"instance-{instance_id}", req["type"], data, key)


def _append(stream: str, type_: str, data: dict[str, Any],
            key: str | None = None) -> ResponseReturnValue:
    result = services().append(stream, [NewEvent(type_, data)], None, who(), key)
    return reply(schemas.Appended, {"stream": stream, "version": result.version})


@route("/hosts/<host_id>/desired", query=schemas.DesiredQuery, response=schemas.Desired,
       tag="agents", errors=(400, 401, 403, 422))
def host_desired(host_id: str) -> ResponseReturnValue:
    """The host's desired state past version `after`: its placements, each with its
    release's bundle and slug digests, command and config vars (nothing when it has not
    moved)."""
    require_host(who(), host_id)
    q = query(schemas.DesiredQuery)
    fold = services().placements()
    version = fold.version(host_id)
    if version <= q["after"] and not q["apps"]:
        return reply(schemas.Desired, {"host_id": host_id, "version": version,
                                       "changed": False, "placements": [], "apps": {}})
    placed, runs = fold.of(host_id), fold.run_releases(host_id)
    apps = {name: info for name in sorted({p.app for p in placed} | set(runs) | set(q["apps"]))
            if (info := _app(name, {p.release for p in placed if p.app == name}
                             | runs.get(name, set()), fold)) is not None}
    return reply(schemas.Desired, {
        "host_id": host_id, "version": version, "changed": True, "apps": apps,
        "placements": [{"instance_id": p.instance_id, "app": p.app, "release": p.release,
                        "process_type": p.process_type, "port": p.port} for p in placed]})


def _app(name: str, needed: set[int], fold: Placements) -> dict[str, Any] | None:
    """What the host may know of one app: every release's digest (to keep or remove its
    files); for an app placed here or running a one-off here (`needed`: those releases),
    also the procfiles and the config vars of those releases and of the one the placer runs
    (Placements.shown). None:
    no such app."""
    try:
        state = services().read_app(name)
        if any(state.release(n) is None for n in needed):  # our fold is a moment behind
            state = services().load_app(name)
    except NotFound:
        return None
    if not state.exists:
        return None
    deployed, failed = fold.deployed.get(name), fold.failed.get(name, {})
    current = state.current.number if state.current else None
    here = bool(needed)
    shown = fold.shown(name, current, needed)
    slugs = _slugs(state, shown | {n for n in (current, deployed) if n is not None})
    return {
        "current": current, "deployed": deployed, "sizes": dict(state.sizes), "uid": state.uid,
        # Reasons quote a failed release phase's output: the app's, not a host's to read
        # unless the app is here (an agent may ask of any app it still has files of).
        "failed": {str(n): reason if here else "" for n, reason in failed.items()},
        "releases": {str(r.number): {"digest": r.bundle_digest,
                                     "procfile": r.procfile if here else {},
                                     "config_version": r.config_version,
                                     "slug": slugs.get(r.number)}
                     for r in state.releases},
        "configs": _configs(state, shown),
        "addons": addon_places(state) if here else [],
    }


def addon_places(state: AppState) -> list[str]:
    """Where the app's add-ons run (host:port), its own and those attached to it: the
    add-on ports its host's agent lets it reach (agents/netrules.py). An add-on recorded
    without `where` (older events) is where its config var's URL points."""
    out = []
    for a in state.addons:
        if a.where:
            out.append(a.where)
            continue
        try:
            url = urlsplit(state.config.get(a.config_var, ""))
            if url.hostname and url.port:
                out.append(f"{url.hostname}:{url.port}")
        except ValueError:
            continue
    return sorted(set(out))


def _slugs(state: AppState, releases: set[int]) -> dict[int, str]:
    """The slug digests of these releases (built ones): what an agent runs (w11)."""
    out = {}
    for r in state.releases:
        if r.number in releases:
            b = fold_build(services().ledger.read_stream(build_stream(state.name,
                                                                    r.stream_version)))
            if b.status == "succeeded" and b.slug_digest:
                out[r.number] = b.slug_digest
    return out


def _configs(state: AppState, releases: set[int]) -> dict[str, dict[str, str]]:
    versions = {r.config_version for r in state.releases if r.number in releases}
    return {str(v): state.configs.get(v, {}) for v in sorted(versions)}


@route("/hosts/<host_id>/stats", "POST", body=schemas.StatsSamples, response=schemas.Written,
       tag="agents", errors=(400, 401, 403, 422))
def host_stats(host_id: str) -> ResponseReturnValue:
    """An agent's stats samples of its running instances (requests, restarts, memory,
    CPU), one row each in stats.instance_samples."""
    require_host(who(), host_id)
    samples = body(schemas.StatsSamples)["samples"]
    fold, svc = services().placements(), services()
    for s in samples:
        placed = fold.hosts.get(host_id, {}).get(s["instance_id"])
        if (placed is None or placed.app != s["app"]) and not svc.views.on_host(
                s["instance_id"], host_id):
            raise Forbidden(f"instance {s['instance_id']} is not placed on host {host_id}")
    svc.stats.write([Sample(s["app"], s["instance_id"], host_id, s["requests"], s["restarts"],
                            s["memory_bytes"], s["cpu_seconds"]) for s in samples])
    return reply(schemas.Written, {"written": len(samples)})


@route("/apps/<name>/runs/<int:number>/ended", "POST", body=schemas.RunEndedReport,
       response=schemas.Appended, tag="agents", errors=(400, 401, 403, 404, 422))
def run_ended(name: str, number: int) -> ResponseReturnValue:
    """The agent of the host a one-off run was sent to says how it ended (RunEnded in the
    app's stream). Only that host's agent; an end already recorded is not recorded again."""
    caller = who()
    require_role(caller, "agent")
    report = body(schemas.RunEndedReport)
    run = services().load_app(name).run(number)
    if run is None or run.run_id != report["run_id"]:
        raise NotFound(f"app {name} has no run.{number} with that id")
    if run.host_id != caller.host_id:
        raise Forbidden(f"run.{number} of {name} was not sent to host {caller.host_id}")
    key = f"{caller.name}/{report['key']}" if report["key"] else None
    stream = f"app-{name}"
    result = services().append(stream, [NewEvent("RunEnded", {
        "app": name, "number": number, "run_id": run.run_id, "exit_code": report["exit_code"],
        "seconds": report["seconds"], "host_id": caller.host_id})], None, caller, key)
    return reply(schemas.Appended, {"stream": stream, "version": result.version})
