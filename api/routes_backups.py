"""Backups of an app's database, as Heroku's `pg:backups` offers them to the app's people:
list, capture, restore (with the app's name as confirmation), download. Only the app's
members (and admins) reach them (`app_state` checks). Taking, restoring and storing dumps
is the backup agent's code (agents/backups/), wired in by tally/ as
Settings.addon_backups and run on the API host, which holds the repository."""

from __future__ import annotations

from flask import send_file
from flask.typing import ResponseReturnValue

from api import schemas
from api.errors import Conflict, NotFound, Unprocessable
from api.routes_apps import app_state
from api.services import AddonBackups
from api.web import body, reply, route, services, who


def _backups() -> AddonBackups:
    found = services().settings.addon_backups
    if found is None:
        raise Conflict("backups of add-ons are not enabled on this platform")
    return found


def _listed(app: str) -> list[dict]:
    found = services().settings.addon_backups
    return found.list(app) if found is not None else []


def _one(app: str, backup_id: str) -> dict:
    for b in _listed(app):
        if b["backup_id"] == backup_id:
            return b
    raise NotFound(f"{app} has no backup {backup_id}")


@route("/apps/<name>/backups", response=schemas.AppBackups, tag="backups",
       errors=(401, 403, 404))
def list_app_backups(name: str) -> ResponseReturnValue:
    """The backups of the app's database, oldest first (`state`: running, completed,
    verified, failed, pruned)."""
    app_state(name)
    return reply(schemas.AppBackups, {"app": name, "backups": _listed(name)})


@route("/apps/<name>/backups", "POST", response=schemas.AppBackup, status=201,
       tag="backups", errors=(401, 403, 404, 409, 503))
def capture_app_backup(name: str) -> ResponseReturnValue:
    """Dump the app's database now (pg_dump -Fc), verified; answers when it is done."""
    if app_state(name).addon(f"postgresql-{name}") is None:
        raise Conflict(f"{name} has no postgresql add-on of its own to back up")
    return reply(schemas.AppBackup, _backups().capture(name, who().name), 201)


@route("/apps/<name>/backups/<backup_id>/restore", "POST", body=schemas.BackupRestore,
       response=schemas.AppBackup, tag="backups", errors=(400, 401, 403, 404, 409, 422, 503))
def restore_app_backup(name: str, backup_id: str) -> ResponseReturnValue:
    """Restore the app's database from one of its verified backups, in place (what the
    backup holds is dropped and made again, in one transaction). `confirm` must be the
    app's name."""
    app_state(name)
    if body(schemas.BackupRestore)["confirm"] != name:
        raise Unprocessable(f"this overwrites {name}'s database: confirm with the app's name",
                            {"confirm": [f"must be {name}"]})
    backup = _one(name, backup_id)
    if backup["state"] != "verified":
        raise Conflict(f"backup {backup_id} is {backup['state']}: only a verified backup is "
                       f"restored")
    _backups().restore(name, backup_id)
    return reply(schemas.AppBackup, backup)


@route("/apps/<name>/backups/<backup_id>/download", tag="backups",
       raw_response="application/octet-stream", errors=(401, 403, 404))
def download_app_backup(name: str, backup_id: str) -> ResponseReturnValue:
    """The backup's file (a pg_dump custom-format archive: `pg_restore` reads it)."""
    app_state(name)
    backup = _one(name, backup_id)
    path = services().settings.addon_backups.file(name, backup_id)  # type: ignore[union-attr]
    if backup["state"] not in ("verified", "completed") or not path.exists():
        raise NotFound(f"backup {backup_id} of {name} is {backup['state']}: no file")
    return send_file(path, mimetype="application/octet-stream",
                     download_name=f"{backup_id}.dump")
