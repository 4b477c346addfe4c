"""Endpoints of history: the ledger's events (filtered, long-polled), the views as they were
at a position, and why an app is or is not serving."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask.typing import ResponseReturnValue

from api import schemas
from api.auth import require_role
from api.errors import Unprocessable
from api.routes_apps import app_state
from api.web import query, reply, route, services, who
from ledger import Ledger, RecordedEvent
from ledger.payloads import redacted

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
    except ValueError as exc:
        raise _unreplayable(exc, "at") from exc
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
    except ValueError as exc:
        raise _unreplayable(exc, "a") from exc
    return reply(schemas.Diff, {"a": q["a"], "b": q["b"], "views": jsonable(found)})


def _unreplayable(exc: ValueError, position: str) -> Unprocessable:
    """A replay's BadPosition or UnknownProjector: bad input, said plainly, against the
    `position` field or `view`."""
    return Unprocessable(str(exc), {position if "position" in str(exc) else "view":
                                    [str(exc)]})
