"""Endpoints of users and tokens, the fleet (hosts, placements, instances, routes, backups),
and history (events, state at a position, why). Agents talk to these with host-scoped
tokens: their heartbeats, their instances' events, their placements."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Response, stream_with_context
from flask.typing import ResponseReturnValue

from api import auth, schemas
from api.auth import require_host, require_role
from api.errors import Conflict, Forbidden, NotFound, Unavailable, Unprocessable
from api.routes_apps import app_state
from api.runs import under_way
from api.state import Run
from api.web import body, query, reply, route, services, who
from ledger import NO_STREAM, Ledger, NewEvent, RecordedEvent, VersionConflict
from ledger.catalogue import redacted
from projectors.views import Views

# --- users and tokens -----------------------------------------------------------------------


@route("/me", response=schemas.User, tag="users", errors=(401,))
def me() -> ResponseReturnValue:
    """Who the token belongs to (what `tally login` checks)."""
    caller = who()
    return reply(schemas.User, {"name": caller.name, "role": caller.role,
                                "host_id": caller.host_id, "token_ids": [caller.token_id]})


@route("/users", response=schemas.Rows, tag="users", errors=(401, 403))
def list_users() -> ResponseReturnValue:
    """Every user and their token ids (admins only)."""
    require_role(who(), "admin")
    d = services().directory(force=True)
    items = [{"name": u.name, "role": u.role, "host_id": u.host_id,
              "token_ids": d.token_ids(u.name)} for u in sorted(d.users.values(),
                                                                 key=lambda u: u.name)]
    return reply(schemas.Rows, {"items": items})


@route("/users", "POST", body=schemas.UserCreate, response=schemas.Token, status=201,
       tag="users", errors=(400, 401, 403, 409, 422))
def create_user() -> ResponseReturnValue:
    """Create a user (admin, member, or an agent bound to a host) with a first token."""
    require_role(who(), "admin")
    req = body(schemas.UserCreate)
    if (req["role"] == "agent") != bool(req["host_id"]):
        raise Unprocessable("an agent needs a host_id, and only an agent has one",
                            {"host_id": ["required for agents only"]})
    token, events = auth.user_events(req["name"], req["role"], req["host_id"])
    try:
        services().append(f"user-{req['name']}", events, NO_STREAM, who())
    except VersionConflict as exc:
        raise Conflict(f"a user named {req['name']!r} exists", {"name": ["taken"]}) from exc
    return reply(schemas.Token, {"user": req["name"], "role": req["role"],
                                 "token_id": events[1].data["token_id"], "token": token}, 201)


def _self_or_admin(name: str) -> auth.Principal:
    caller = who()
    if not caller.is_admin and caller.name != name:
        raise Forbidden("only an admin may manage another user's tokens")
    user = services().directory(force=True).users.get(name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


@route("/users/<name>/tokens", "POST", body=schemas.TokenCreate, response=schemas.Token,
       status=201, tag="users", errors=(400, 401, 403, 404, 422))
def issue_token(name: str) -> ResponseReturnValue:
    """Issue another token for a user (yourself, or anyone as an admin; an agent's tokens
    only as an admin: a stolen agent token must not outlive its revocation)."""
    require_role(who(), "admin", "member")
    user = _self_or_admin(name)
    label = body(schemas.TokenCreate)["label"]
    token, token_id, digest = auth.new_token()
    services().append(f"user-{name}", [NewEvent("TokenIssued", {
        "user": name, "token_id": token_id, "token_hash": digest, "label": label})], None, who())
    return reply(schemas.Token, {"user": name, "role": user.role, "token_id": token_id,
                                 "token": token}, 201)


@route("/users/<name>/tokens/<token_id>", "DELETE", tag="users", status=204,
       errors=(401, 403, 404))
def revoke_token(name: str, token_id: str) -> ResponseReturnValue:
    """Revoke a token: it opens nothing from now on."""
    _self_or_admin(name)
    if token_id not in services().directory().token_ids(name):
        raise NotFound(f"{name} has no live token {token_id!r}")
    services().append(f"user-{name}", [NewEvent("TokenRevoked", {
        "user": name, "token_id": token_id})], None, who())
    services().directory(force=True)
    return Response(status=204)


# --- hosts and agents -----------------------------------------------------------------------


@route("/hosts", response=schemas.Rows, tag="fleet", errors=(401, 403))
def list_hosts() -> ResponseReturnValue:
    """The fleet, from the hosts view (admins only)."""
    require_role(who(), "admin")
    return reply(schemas.Rows, {"items": services().hosts()})


@route("/hosts/<host_id>", "PUT", body=schemas.HostRegister, response=schemas.Appended,
       tag="agents", errors=(400, 401, 403, 409, 422))
def register_host(host_id: str) -> ResponseReturnValue:
    """An agent registers its host: address, port range, capacity (and its run endpoint,
    memory). A re-registration keeps what it does not name; the first must name the
    address, port range and capacity."""
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
    return reply(schemas.Appended, {"stream": stream, "version": result.version})


@route("/hosts/<host_id>/heartbeats", "POST", body=schemas.Heartbeat,
       response=schemas.Appended, tag="agents", errors=(400, 401, 403, 422))
def heartbeat(host_id: str) -> ResponseReturnValue:
    """An agent says its host is alive."""
    require_host(who(), host_id)
    return _append(f"heartbeat-{host_id}", "HostHeartbeat",
                   {"host_id": host_id, **body(schemas.Heartbeat)})


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
        if not caller.host_id or not services().views.on_host(instance_id, caller.host_id):
            raise Forbidden(f"instance {instance_id} is not placed on host {caller.host_id}")
        data["host_id"] = caller.host_id
    else:
        require_role(caller, "admin")
    return _append(f"instance-{instance_id}", req["type"], data)


def _append(stream: str, type_: str, data: dict[str, Any]) -> ResponseReturnValue:
    result = services().append(stream, [NewEvent(type_, data)], None, who())
    return reply(schemas.Appended, {"stream": stream, "version": result.version})


def _fleet_view(path: str, rows: Callable[[Views], list[dict[str, Any]]], doc: str) -> None:
    """GET <path>: every row of a fleet-wide view (admins only)."""
    def view() -> ResponseReturnValue:
        require_role(who(), "admin")
        return reply(schemas.Rows, {"items": rows(services().views)})
    view.__name__, view.__doc__ = f"list_{path.strip('/')}", doc
    route(path, response=schemas.Rows, tag="fleet", errors=(401, 403))(view)


for _path, _rows, _doc in (
    ("/placements", Views.placements, "Every placement (admins only)."),
    ("/instances", Views.instances, "Every instance, placed or still running (admins only)."),
    ("/routes", Views.routes, "The routing table: hostname -> app and healthy backends "
                                "(admins only)."),
    ("/backups", Views.backups, "Backups per target: last good one, last failure, the "
                                  "retained set (admins only)."),
):
    _fleet_view(_path, _rows, _doc)


@route("/apps/<name>/ps", response=schemas.Rows, tag="apps", errors=(401, 403, 404))
def ps(name: str) -> ResponseReturnValue:
    """The app's instances and their state."""
    app_state(name)
    svc = services()
    rows = svc.views.instances(name)
    return reply(schemas.Rows, {"items": rows + [_run_row(r) for r in
                                                 under_way(svc.load_app(name))]})


def _run_row(r: Run) -> dict[str, Any]:
    """A one-off run under way, as `tally ps` lists it beside the instances: run.N."""
    return {"instance_id": f"run.{r.number}", "process_type": "run", "release": r.release,
            "host_id": r.host_id, "port": None, "state": "detached" if r.detached else
            "attached", "since": r.started_at, "restarts": 0, "exit_code": None,
            "command": " ".join(r.command), "actor": r.actor}


@route("/apps/<name>/placements", response=schemas.Rows, tag="apps", errors=(401, 403, 404))
def app_placements(name: str) -> ResponseReturnValue:
    """Where the placer put the app's instances."""
    app_state(name)
    return reply(schemas.Rows, {"items": services().views.placements(name)})


@route("/apps/<name>/routes", response=schemas.Rows, tag="apps", errors=(401, 403, 404))
def app_routes(name: str) -> ResponseReturnValue:
    """The hostnames routed to the app and their backends."""
    app_state(name)
    return reply(schemas.Rows, {"items": services().views.routes(name)})


# --- history --------------------------------------------------------------------------------

SCAN_PAGES = 20
PAGE = 1000


@route("/events", query=schemas.EventsQuery, response=schemas.EventList, tag="history",
       errors=(400, 401, 403, 422))
def events() -> ResponseReturnValue:
    """The ledger after a position, filtered by stream, category, type and time; `wait`
    long-polls (admins only; members read their app's events under /apps/<name>/events)."""
    require_role(who(), "admin")
    q = query(schemas.EventsQuery)
    wanted = set(q["stream"] or ())
    return reply(schemas.EventList, _events(q, lambda e: not wanted or e.stream in wanted,
                                            q["category"], q["stream"]))


def _check_filters(q: dict[str, Any]) -> None:
    """Refuse filters that can match nothing because they are misspelt (422)."""
    from projectors.inspect import check_filters

    try:
        for field, values in (("stream", q["stream"]), ("category", q["category"]),
                              ("type", q["type"])):
            for v in values or ():
                check_filters(*(v if f == field else None
                                for f in ("stream", "category", "type")))
    except ValueError as exc:
        raise Unprocessable(str(exc), {"filters": [str(exc)]}) from exc


@route("/apps/<name>/events", query=schemas.EventsQuery, response=schemas.EventList,
       tag="history", errors=(400, 401, 403, 404, 422))
def app_events(name: str) -> ResponseReturnValue:
    """The app's own events (its stream and its placements), config values redacted
    unless show_secrets."""
    app_state(name)
    q = query(schemas.EventsQuery)
    own = {f"app-{name}", f"placement-{name}"}
    streams = own & set(q["stream"]) if q["stream"] else own
    if not streams:
        raise Unprocessable(f"app {name}'s streams are {', '.join(sorted(own))}",
                            {"stream": ["not the app's"]})
    return reply(schemas.EventList, _events(q, lambda e: e.stream in streams,
                                            ["app", "placement"], sorted(streams)))


def _events(q: dict[str, Any], keep: Callable[[RecordedEvent], bool],
            categories: list[str] | None, streams: list[str] | None) -> dict[str, Any]:
    """Scan forward from `after` (a bounded number of pages), long-polling while nothing
    matched and the scan reached the end of the ledger; or, with `newest`, the last
    `limit` events. `head` is where to continue from: a scan cut short answers at once, so
    one request never walks the whole history. Only `long_poll_slots` requests wait at
    once (each holds a thread); others answer at once."""
    _check_filters(q)
    svc = services()
    if q["newest"]:
        head = svc.ledger.sequence()
        found = svc.ledger.read_all(q["after"], limit=q["limit"], upto=head,
                                    streams=streams, categories=categories,
                                    types=q["type"], since=q["since"], newest=True)
        found = [e for e in found if keep(e)]
        return {"events": [_shown(e, q["show_secrets"]) for e in found], "head": head}
    wait = min(q["wait"], svc.settings.long_poll_max_s)
    slot = wait > 0 and svc.long_polls.acquire(blocking=False)
    try:
        return _scan(svc.ledger, q, keep, categories,
                     time.monotonic() + (wait if slot else 0))
    finally:
        if slot:
            svc.long_polls.release()


def _scan(ledger: Ledger, q: dict[str, Any], keep: Callable[[RecordedEvent], bool],
          categories: list[str] | None, deadline: float) -> dict[str, Any]:
    after = q["after"]
    while True:
        found: list[RecordedEvent] = []
        cut_short = True
        for _ in range(SCAN_PAGES):
            page = ledger.read_all(after, limit=PAGE, categories=categories, types=q["type"],
                                   since=q["since"])
            found += [e for e in page if keep(e)][: q["limit"] - len(found)]
            if len(found) >= q["limit"]:
                after = found[-1].position or after
                break
            if page:
                after = page[-1].position or after
            if len(page) < PAGE:
                cut_short = False
                break
        if found or cut_short or time.monotonic() >= deadline:
            return {"events": [_shown(e, q["show_secrets"]) for e in found], "head": after}
        ledger.sequence()
        time.sleep(0.2)


def _shown(e: RecordedEvent, secrets: bool) -> dict[str, Any]:
    """An event as a client sees it: secret values redacted unless asked for."""
    d = e.as_dict()
    if not secrets:
        d["data"] = redacted(e.type, e.data)
    return d


@route("/apps/<name>/why", response=schemas.Why, tag="history", errors=(401, 403, 404))
def why(name: str) -> ResponseReturnValue:
    """Why the app is or is not serving, in sentences citing ledger positions."""
    from projectors.inspect import why as explain

    app_state(name)
    services().ledger.sequence()
    return reply(schemas.Why, explain(services().settings.dsn, name,
                                      datetime.now(UTC)).as_dict())


@route("/state", query=schemas.StateQuery, response=schemas.State, tag="history",
       errors=(400, 401, 403, 422))
def state_at() -> ResponseReturnValue:
    """The views as they were at a ledger position, replayed from history (admins only)."""
    from projectors.replay import jsonable
    from projectors.replay import state_at as replay

    require_role(who(), "admin")
    q = query(schemas.StateQuery)
    try:
        views = replay(services().settings.dsn, q["at"], q["view"])
    except ValueError as exc:  # BadPosition, UnknownProjector: bad input, said plainly
        raise Unprocessable(str(exc), {"at" if "position" in str(exc) else "view":
                                       [str(exc)]}) from exc
    return reply(schemas.State, {"at": q["at"], "views": jsonable(views)})


@route("/diff", query=schemas.DiffQuery, response=schemas.Diff, tag="history",
       errors=(400, 401, 403, 422))
def diff() -> ResponseReturnValue:
    """What changed in each view between two ledger positions (admins only)."""
    from projectors.replay import diff as changes
    from projectors.replay import jsonable

    require_role(who(), "admin")
    q = query(schemas.DiffQuery)
    try:
        found = changes(services().settings.dsn, q["a"], q["b"], q["view"])
    except ValueError as exc:  # BadPosition, UnknownProjector: bad input, said plainly
        raise Unprocessable(str(exc), {"a" if "position" in str(exc) else "view":
                                       [str(exc)]}) from exc
    return reply(schemas.Diff, {"a": q["a"], "b": q["b"], "views": jsonable(found)})


@route("/apps/<name>/stats", query=schemas.StatsQuery, response=schemas.Stats, tag="apps",
       errors=(400, 401, 403, 404, 422))
def stats(name: str) -> ResponseReturnValue:
    """The app's requests, memory, CPU and restarts over the last minutes."""
    app_state(name)
    minutes = query(schemas.StatsQuery)["minutes"]
    return reply(schemas.Stats, services().stats.read(name, minutes))


@route("/apps/<name>/logs", query=schemas.LogsQuery, response=schemas.Logs, tag="apps",
       raw_response="text/event-stream",
       errors=(400, 401, 403, 404, 422))
def logs(name: str) -> ResponseReturnValue:
    """The app's last log lines, as the log collector stored them."""
    app_state(name)
    q = query(schemas.LogsQuery)
    svc = services()
    tail, follow = svc.settings.logs_tail, svc.settings.logs_follow
    if tail is None:
        raise NotFound("logs are not collected on this platform (no log collector)")
    if not q["follow"]:
        return reply(schemas.Logs, {"app": name, "lines": tail(name, q["lines"])})
    if follow is None:
        raise NotFound("logs cannot be followed on this platform")
    if not svc.long_polls.acquire(blocking=False):
        raise Unavailable("this API process follows as many streams as it may: try again")
    return Response(stream_with_context(_sse(name, tail(name, q["lines"]), follow)),
                    mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


LOGS_KEEPALIVE_S = 5.0


def _sse(name: str, first: list[str],
         follow: Callable[[str, threading.Event], Iterator[str]]) -> Iterator[str]:
    """Server-sent events: the last lines, then each new one; a comment every few seconds
    while quiet, so a client that left is noticed (its write fails) and a client can tell
    a quiet app from a lost API."""
    stop = threading.Event()
    try:
        yield from (f"data: {line}\n\n" for line in first)
        quiet = time.monotonic()
        for line in follow(name, stop):
            if line:
                yield f"data: {line}\n\n"
                quiet = time.monotonic()
            elif time.monotonic() - quiet > LOGS_KEEPALIVE_S:
                yield ": alive\n\n"
                quiet = time.monotonic()
    finally:
        stop.set()
        services().long_polls.release()
