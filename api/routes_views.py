"""Endpoints that read what the platform observes: the projectors' views (placements,
instances, routes, backups; an app's ps, placements and routes), an app's stats and logs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, stream_with_context
from flask.typing import ResponseReturnValue

from api import schemas
from api.auth import require_role
from api.errors import NotFound, Unavailable
from api.routes_apps import app_state
from api.runs import under_way
from api.state import Run
from api.web import query, reply, route, services, who
from projectors.views import Views


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
