"""Builds as the app's people see them (status, reason, output as it comes) and slugs as
host agents fetch them. Build output is the sandbox's: it can hold nothing of the
platform's, but it is the app's, so only its people (and admins) read it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import send_file
from flask.typing import ResponseReturnValue

from api import bundles, decide, schemas
from api.errors import Forbidden, NotFound
from api.routes_apps import app_state, release_reader_state
from api.state import AppState, Release
from api.web import query, reply, route, services, who
from ledger.builds import Build, build_stream, fold


def build_of(state: AppState, release: Release) -> Build:
    return fold(services().ledger.read_stream(build_stream(state.name, release.stream_version)))


def _release(state: AppState, number: int) -> Release:
    found = state.release(number)
    if found is None:
        raise NotFound(f"app {state.name} has no release v{number}")
    return found


def output_file(state: AppState, release: Release) -> Path | None:
    logs = services().settings.build_logs_dir
    if logs is None:
        return None
    return logs / state.name / f"{build_stream(state.name, release.stream_version)}.log"


OUTPUT_MAX = 8 << 20
"""A build's output kept, at most (bytes): a build printing without end fills no disk."""
CUT = "\n-----> The build's output passed 8 MiB: the rest is not kept\n"


def write_output(path: Path, text: str, fresh: bool = False) -> None:
    """Add to (or with `fresh`, start) a build's output file, up to OUTPUT_MAX (then one
    line says the rest was cut). Apps may run on the API's machine: the folders are 0700
    and the file 0600, the API's alone, whatever umask."""
    for folder in (path.parent.parent, path.parent):
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if fresh else os.O_APPEND)
    fd = os.open(path, flags, 0o600)
    with open(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        room = OUTPUT_MAX - os.fstat(fd).st_size
        data = text.encode("utf-8", "replace")
        if len(data) > room > 0:
            data = data[:room] + CUT.encode()
        if room > 0:
            f.write(data)


def _dict(release: Release, b: Build) -> dict[str, Any]:
    return {"release": release.number, "status": b.status, "builder": b.builder or None,
            "attempt": b.attempt, "slug_digest": b.slug_digest, "size_bytes": b.size_bytes,
            "seconds": b.seconds, "reason": b.reason, "reused_from": b.reused_from}


@route("/apps/<name>/builds", response=schemas.BuildList, tag="builds",
       errors=(401, 403, 404))
def list_builds(name: str) -> ResponseReturnValue:
    """The builds of the app's last 20 releases, newest first."""
    state = app_state(name)
    rows = [_dict(r, build_of(state, r)) for r in reversed(state.releases[-20:])]
    return reply(schemas.BuildList, {"builds": rows})


@route("/apps/<name>/releases/<int:number>/build", query=schemas.BuildQuery,
       response=schemas.Build, tag="builds", errors=(400, 401, 403, 404, 422))
def show_build(name: str, number: int) -> ResponseReturnValue:
    """A release's build, with its output from `offset` (poll it to follow a build)."""
    args = query(schemas.BuildQuery)
    state = app_state(name)
    release = _release(state, number)
    b = build_of(state, release)
    out, offset = "", args["offset"]
    path = output_file(state, release)
    if path is not None and path.exists():
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read(args["limit"])
        cut = chunk.rfind(b"\n") + 1 if b.status in ("pending", "building") else len(chunk)
        out, offset = chunk[:cut].decode("utf-8", "replace"), offset + cut
    return reply(schemas.Build, {**_dict(release, b), "output": out, "offset": offset})


@route("/apps/<name>/releases/<int:number>/slug", tag="builds",
       raw_response="application/gzip", errors=(401, 403, 404))
def download_slug(name: str, number: int) -> ResponseReturnValue:
    """The release's slug: for agents of hosts it is placed on or that run a one-off
    command of it, for balancers the one the routes serve static files from, and for the
    app's people."""
    svc = services()
    if who().role == "balancer":
        state = svc.load_app(name)
        decide.require_app(state)
        if not svc.views.routes_slug(name, number):
            raise Forbidden(f"the routes serve no static files from v{number} of {name}")
    else:
        state = release_reader_state(name, number)
    b = build_of(state, _release(state, number))
    if b.slug_digest is None:
        raise NotFound(f"v{number} of {name} has no slug: its build is {b.status}")
    path = bundles.path_of(svc.settings.bundles_dir, b.slug_digest)
    if not path.exists():
        raise NotFound(f"the slug of v{number} is missing from the store")
    return send_file(path, mimetype="application/gzip", download_name=path.name,
                     etag=b.slug_digest)
