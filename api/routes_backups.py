"""Backups of an app's add-ons, as Heroku's `pg:backups` offers them to the app's people:
list, capture, restore (with the app's name as confirmation, and its steps as a stream if
asked), download; `kind` says which add-on (postgresql: pg_dump archives, redis: RDBs).
Only the app's members (and admins) reach them (`app_state` checks). Taking, restoring and
storing them is the backup agent's code (agents/backups/), wired in by tally/ as
Settings.addon_backups and run on the API host, which holds the repository."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator

from flask import Response, send_file, stream_with_context
from flask.typing import ResponseReturnValue

from api import schemas
from api.errors import ApiError, Conflict, NotFound, Unprocessable
from api.routes_apps import app_state
from api.services import AddonBackups
from api.web import body, query, reply, route, services, who

KEEPALIVE_S = 5.0
KINDS = ("postgresql", "redis")


def _backups() -> AddonBackups:
    found = services().settings.addon_backups
    if found is None:
        raise Conflict("backups of add-ons are not enabled on this platform")
    return found


def _listed(app: str, kind: str) -> list[dict]:
    found = services().settings.addon_backups
    return found.list(app, kind) if found is not None else []


def _one(app: str, backup_id: str) -> dict:
    for kind in KINDS:
        for b in _listed(app, kind):
            if b["backup_id"] == backup_id:
                return b
    raise NotFound(f"{app} has no backup {backup_id}")


@route("/apps/<name>/backups", query=schemas.BackupsQuery, response=schemas.AppBackups,
       tag="backups", errors=(400, 401, 403, 404, 422))
def list_app_backups(name: str) -> ResponseReturnValue:
    """The backups of the app's database (or, `kind=redis`, of its Redis), oldest first
    (`state`: running, completed, verified, failed, pruned)."""
    app_state(name)
    kind = query(schemas.BackupsQuery)["kind"]
    return reply(schemas.AppBackups, {"app": name, "backups": _listed(name, kind)})


@route("/apps/<name>/backups", "POST", query=schemas.BackupsQuery, response=schemas.AppBackup,
       status=201, tag="backups", errors=(400, 401, 403, 404, 409, 422, 503))
def capture_app_backup(name: str) -> ResponseReturnValue:
    """Back up the app's database now (pg_dump -Fc; `kind=redis`: an RDB of its Redis),
    verified; answers when it is done."""
    kind = query(schemas.BackupsQuery)["kind"]
    if app_state(name).addon(f"{kind}-{name}") is None:
        raise Conflict(f"{name} has no {kind} add-on of its own to back up")
    return reply(schemas.AppBackup, _backups().capture(name, who().name, kind), 201)


@route("/apps/<name>/backups/<backup_id>/restore", "POST", body=schemas.BackupRestore,
       response=schemas.AppBackup, raw_response="text/event-stream", tag="backups",
       errors=(400, 401, 403, 404, 409, 422, 503))
def restore_app_backup(name: str, backup_id: str) -> ResponseReturnValue:
    """Restore the app's add-on (its database or its Redis, as the backup is) from one of
    its verified backups, in place: what the backup holds replaces what is there.
    `confirm` must be the app's name; `progress` streams each step."""
    state = app_state(name)
    req = body(schemas.BackupRestore)
    if req["confirm"] != name:
        raise Unprocessable(f"this overwrites {name}'s data: confirm with the app's name",
                            {"confirm": [f"must be {name}"]})
    backup = _one(name, backup_id)
    if backup["state"] != "verified":
        raise Conflict(f"backup {backup_id} is {backup['state']}: only a verified backup is "
                       f"restored")
    if state.addon(f"{backup['kind']}-{name}") is None:
        raise Conflict(f"{name} has no {backup['kind']} add-on to restore into")
    backups, actor = _backups(), who().name
    if not req["progress"]:
        backups.restore(name, backup, actor)
        return reply(schemas.AppBackup, backup)
    return Response(stream_with_context(_steps(
        lambda say: backups.restore(name, backup, actor, say), backup)),
        mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _steps(work: Callable[[Callable[[str], None]], None], backup: dict) -> Iterator[str]:
    """Server-sent events of a restore: each step as it is said, a comment while quiet,
    then `done` (the backup) or `error` (why). The work runs on a thread of its own and
    goes on to its end if the client leaves: a restore is never left half done."""
    said: queue.Queue[tuple[str, str]] = queue.Queue()

    def run() -> None:
        try:
            work(lambda line: said.put(("", line)))
            said.put(("done", json.dumps(backup)))
        except ApiError as exc:
            said.put(("error", exc.message))
        except Exception as exc:  # said to the client, whatever it is: the stream has begun
            said.put(("error", f"the restore failed: {exc}"))

    threading.Thread(target=run, name="restore", daemon=True).start()
    while True:
        try:
            event, line = said.get(timeout=KEEPALIVE_S)
        except queue.Empty:
            yield ": alive\n\n"
            continue
        yield (f"event: {event}\n" if event else "") + f"data: {line}\n\n"
        if event:
            return


@route("/apps/<name>/backups/<backup_id>/download", tag="backups",
       raw_response="application/octet-stream", errors=(401, 403, 404))
def download_app_backup(name: str, backup_id: str) -> ResponseReturnValue:
    """The backup's file: a pg_dump custom-format archive (`pg_restore` reads it) or a
    Redis RDB."""
    app_state(name)
    backup = _one(name, backup_id)
    path = _backups().file(name, backup)
    if backup["state"] not in ("verified", "completed") or not path.exists():
        raise NotFound(f"backup {backup_id} of {name} is {backup['state']}: no file")
    suffix = ".rdb" if backup["kind"] == "redis" else ".dump"
    return send_file(path, mimetype="application/octet-stream",
                     download_name=f"{backup_id}{suffix}")
