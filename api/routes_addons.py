"""Endpoints of add-ons: an app's PostgreSQL database in the platform's apps cluster or its
Redis, and their lifecycle (create, list, attach to another app of the same owner, detach,
destroy; deleting an app destroys its own). The rules are decided here and in api/decide.py;
making and dropping the services is agents/addons.py's, wired in by tally/ as
Settings.create_addon / destroy_addon and run on the API host. Each step is an event in the
app's stream (AddonCreated, AddonAttached, AddonDetached, AddonDestroyed) appended with
the config change it makes (a new release)."""

from __future__ import annotations

from flask.typing import ResponseReturnValue

from api import decide, schemas
from api.errors import Conflict, NotFound, Unprocessable
from api.routes_apps import app_state, authorized, change, failed_releases, gone, owned
from api.state import Addon, AppState
from api.web import body, reply, route, services
from ledger.catalogue import ADDON_PLANS


def listed(state: AppState) -> dict:
    return {"app": state.name, "release": state.current.number if state.current else None,
            "addons": [{"name": a.name, "kind": a.kind, "plan": a.plan,
                        "config_var": a.config_var, "owner": a.owner,
                        "state": "created" if a.owner == state.name else "attached",
                        "where": a.where} for a in state.addons]}


@route("/apps/<name>/addons", response=schemas.Addons, tag="addons", errors=(401, 403, 404))
def list_addons(name: str) -> ResponseReturnValue:
    """The add-ons the app reaches: its own and those attached from its owner's other
    apps."""
    return reply(schemas.Addons, listed(app_state(name)))


@route("/apps/<name>/addons", "POST", body=schemas.AddonCreate, response=schemas.Addons,
       status=201, tag="addons", errors=(400, 401, 403, 404, 409, 422, 503))
def create_addon(name: str) -> ResponseReturnValue:
    """Give the app an add-on of its own (one of each kind): a PostgreSQL database
    (DATABASE_URL) or a Redis (REDIS_URL); sets the var (a new release)."""
    req = body(schemas.AddonCreate)
    kind, plans = req["kind"], ADDON_PLANS[req["kind"]]
    plan = req["plan"] or next(iter(plans))
    if plan not in plans:
        raise Unprocessable(f"{kind} has no plan {plan!r} (plans: {', '.join(plans)})",
                            {"plan": ["unknown"]})
    decide.check_new_addon(app_state(name), kind)  # refused before anything is made
    settings = services().settings
    if settings.create_addon is None or settings.destroy_addon is None:
        raise Conflict("add-ons are not enabled on this platform")
    url, where = settings.create_addon(kind, name, plan)
    failed = failed_releases(name)
    try:
        state = change(name, lambda s: decide.create_addon(s, kind, plan, url, where, failed))
    except BaseException:
        settings.destroy_addon(kind, name)  # not recorded: nothing may reach it
        raise
    return reply(schemas.Addons, listed(state), 201)


@route("/apps/<name>/addons/<addon>", "DELETE", response=schemas.Addons, tag="addons",
       errors=(401, 403, 404, 409, 503))
def destroy_addon(name: str, addon: str) -> ResponseReturnValue:
    """Destroy the app's own add-on (its owner or an admin): its config var is unset (a new
    release) here and in every app it was attached to, then the database and role are
    dropped (or the Redis stopped and removed): its credentials open nothing after."""
    failed = failed_releases(name)
    kept: list[Addon] = []

    def destroy(s: AppState) -> list:
        owned(s)
        kept[:] = [a for a in s.addons if a.name == addon]
        return decide.destroy_addon(s, addon, "addons:destroy", failed)
    state = change(name, destroy)
    gone(state, kept)
    return reply(schemas.Addons, listed(state))


@route("/apps/<name>/attachments", "POST", body=schemas.AttachmentCreate,
       response=schemas.Addons, status=201, tag="addons",
       errors=(400, 401, 403, 404, 409, 422))
def attach_addon(name: str) -> ResponseReturnValue:
    """Let the app reach another app's add-on (both apps of one owner, and the caller
    manages both) under a config var of its own (`as`: ALIAS_URL)."""
    app_state(name)  # the caller's right to change this app comes first
    req = body(schemas.AttachmentCreate)
    addon = req["addon"]
    source_app = addon.partition("-")[2]
    if not source_app:
        raise NotFound(f"no add-on named {addon!r} (add-ons are KIND-APP)")
    try:
        source = authorized(services().load_app(source_app))
    except NotFound:
        raise NotFound(f"no add-on named {addon!r}") from None
    failed = failed_releases(name)
    state = change(name, lambda s: decide.attach_addon(s, source, addon, req["as_"], failed))
    return reply(schemas.Addons, listed(state), 201)


@route("/apps/<name>/attachments/<addon>", "DELETE", response=schemas.Addons, tag="addons",
       errors=(401, 403, 404, 409))
def detach_addon(name: str, addon: str) -> ResponseReturnValue:
    """The app stops reaching another app's add-on (its config var unset: a new release)."""
    failed = failed_releases(name)
    return reply(schemas.Addons, listed(change(name, lambda s: decide.detach_addon(
        s, addon, failed))))

