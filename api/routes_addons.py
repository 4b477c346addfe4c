"""Endpoints of add-ons: an app's PostgreSQL database in the platform's apps cluster. The
rule (one database per app, DATABASE_URL set as a new release) is decided here; creating
the database is the apps cluster's code (agents/addons.py), wired in by tally/ as
Settings.create_database and run on the API host."""

from __future__ import annotations

from flask.typing import ResponseReturnValue

from api import decide, schemas
from api.errors import Conflict
from api.routes_apps import app_state, change, failed_releases
from api.state import AppState
from api.web import body, reply, route, services

CONFIG_VAR = {"postgresql": "DATABASE_URL"}
"""Each kind of add-on and the config var through which the app reaches it."""


def listed(state: AppState) -> dict:
    return {"app": state.name, "release": state.current.number if state.current else None,
            "addons": [{"kind": k, "config_var": v}
                                          for k, v in CONFIG_VAR.items() if v in state.config]}


@route("/apps/<name>/addons", response=schemas.Addons, tag="addons", errors=(401, 403, 404))
def list_addons(name: str) -> ResponseReturnValue:
    """The app's add-ons."""
    return reply(schemas.Addons, listed(app_state(name)))


@route("/apps/<name>/addons", "POST", body=schemas.AddonCreate, response=schemas.Addons,
       status=201, tag="addons", errors=(400, 401, 403, 404, 409, 422, 503))
def create_addon(name: str) -> ResponseReturnValue:
    """Give the app a PostgreSQL database of its own; sets DATABASE_URL (a new release)."""
    kind = body(schemas.AddonCreate)["kind"]
    var = CONFIG_VAR[kind]
    if var in app_state(name).config:
        raise Conflict(f"{name} already has a {var}", {"kind": ["exists"]})
    create = services().settings.create_database
    if create is None:
        raise Conflict("add-ons are not enabled on this platform")
    url = create(name)
    failed = failed_releases(name)
    state = change(name, lambda s: decide.change_config(s, {var: url}, [], failed))
    return reply(schemas.Addons, listed(state), 201)
