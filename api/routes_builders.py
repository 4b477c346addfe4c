"""Endpoints builders talk to with their builder token (role `builder`, bound to the
builder's name): what awaits a build, claims and their renewal, a claimed build's bundle,
its output as it comes, and its outcome (the slug, uploaded here, or why it failed).

With these a builder holds no ledger credentials and reads no bundle store (DESIGN.md,
"Trust boundaries"). Only builder tokens may use them, and only the builder holding a
build's claim may act on that build: the claim is an append at the build stream's version
(of several builders exactly one wins), renewals and outcomes name their attempt, and a
builder whose lease ran out and was taken over is told so (409) and stops.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from flask import request, send_file
from flask.typing import ResponseReturnValue

from api import buildqueue, bundles, schemas
from api.auth import Principal, require_role
from api.errors import Conflict, NotFound, TooLarge, Unprocessable
from api.routes_builds import output_file, write_output
from api.routes_quotas import quota_of
from api.state import AppState, Release
from api.web import body, query, reply, route, services, who
from ledger import NO_STREAM, NewEvent, VersionConflict
from ledger.builds import Build, build_stream, fold
from ledger.uids import build_uid

GZIP_MAGIC = b"\x1f\x8b"


def _builder() -> Principal:
    caller = who()
    require_role(caller, "builder")
    return caller


def _build(app: str, release: Release) -> Build:
    return fold(services().ledger.read_stream(build_stream(app, release.stream_version)))


def _release(name: str, number: int) -> tuple[AppState, Release]:
    state = services().load_app(name)
    found = state.release(number) if state.exists else None
    if found is None:
        raise NotFound(f"app {name} has no release v{number}")
    return state, found


def _held(name: str, number: int, caller: Principal,
          attempt: int) -> tuple[AppState, Release, Build]:
    """The build, if `caller` holds the claim of `attempt` (409 if it does not, any more)."""
    state, release = _release(name, number)
    b = _build(name, release)
    if not buildqueue.holds(b, caller.host_id or "", attempt):
        raise Conflict(f"the claim of attempt {attempt} of v{number} of {name} is not yours "
                       f"(the build is {b.status}, attempt {b.attempt} by {b.builder or '-'})")
    return state, release, b


def _append(name: str, release: Release, events: list[NewEvent], expected: int,
            caller: Principal) -> int:
    stream = build_stream(name, release.stream_version)
    try:
        return services().append(stream, events, expected or NO_STREAM, caller).version
    except VersionConflict as exc:
        raise Conflict(f"the build of v{release.number} of {name} moved meanwhile (another "
                       "builder claimed it)") from exc


def slug_limit(state: AppState) -> int:
    """The largest slug the app may have, in bytes: its slug_mb quota and its owner's."""
    return min(quota_of("app", state.name).slug_mb,
               quota_of("user", state.owner or "").slug_mb) * 2**20


@route("/builds/queue", response=schemas.BuildQueue, tag="builders", errors=(401, 403))
def build_queue() -> ResponseReturnValue:
    """The builds a builder may claim now (never claimed, or their lease ran out), newest
    first. Builder tokens only."""
    _builder()
    svc = services()
    waiting: dict[str, set[int]] = {}
    for app, version in svc.unbuilt().waiting():
        waiting.setdefault(app, set()).add(version)
    now = datetime.now(UTC)
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for app, versions in waiting.items():
        state = svc.load_app(app)
        if not state.exists:
            continue
        builds = {r.number: _build(app, r) for r in state.releases
                  if r.stream_version in versions}
        for r in buildqueue.offered(state, builds, now):
            rows.append((r.created_at or "", app, {"app": app, "release": r.number,
                                                   "attempt": builds[r.number].attempt + 1}))
    rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
    return reply(schemas.BuildQueue, {"builds": [row[2] for row in rows]})


@route("/apps/<name>/releases/<int:number>/build/claim", "POST",
       body=schemas.BuildClaimRequest, response=schemas.BuildClaim, tag="builders",
       errors=(400, 401, 403, 404, 409, 422))
def claim_build(name: str, number: int) -> ResponseReturnValue:
    """Claim a release's build (BuildStarted at its stream's version: of several builders
    exactly one wins; 409 for the others). A release whose bundle the app built before gets
    that slug at once (BuildSucceeded, `reused_from`): nothing to build."""
    caller = _builder()
    lease_s = body(schemas.BuildClaimRequest)["lease_s"]
    state, release = _release(name, number)
    b = _build(name, release)
    if not b.claimable(datetime.now(UTC)):
        raise Conflict(f"the build of v{number} of {name} is {b.status}"
                       + (f" (attempt {b.attempt} by {b.builder})" if b.builder else ""))
    attempt = b.attempt + 1
    events = [NewEvent("BuildStarted", {"app": name, "release": number,
                                        "builder": caller.host_id, "lease_s": lease_s,
                                        "attempt": attempt})]
    same = {r.number: _build(name, r) for r in state.releases
            if r.bundle_digest == release.bundle_digest and r.number != number}
    earlier = buildqueue.earlier_slug(state, release, same)
    if earlier is not None:
        events.append(NewEvent("BuildSucceeded", {
            "app": name, "release": number, "slug_digest": earlier[1].slug_digest,
            "size_bytes": earlier[1].size_bytes, "seconds": 0.0, "reused_from": earlier[0]}))
    _append(name, release, events, b.version, caller)
    path = output_file(state, release)
    if earlier is None and path is not None:
        write_output(path, "", fresh=True)  # a new attempt's output starts afresh
    first, end = services().settings.app_uids
    return reply(schemas.BuildClaim, {
        "app": name, "release": number, "attempt": attempt,
        "reused_from": earlier[0] if earlier else None,
        "bundle_digest": release.bundle_digest,
        "config": state.configs.get(release.config_version, {}),
        "build_uid": build_uid(state.uid, first, end) if state.uid is not None else None,
        "slug_max_bytes": slug_limit(state), "lease_s": lease_s})


@route("/apps/<name>/releases/<int:number>/build/renew", "POST", body=schemas.BuildAttempt,
       response=schemas.Appended, tag="builders", errors=(400, 401, 403, 404, 409, 422))
def renew_build(name: str, number: int) -> ResponseReturnValue:
    """The builder holding the claim renews it for another lease (409: it lost it)."""
    caller = _builder()
    attempt = body(schemas.BuildAttempt)["attempt"]
    _, release, b = _held(name, number, caller, attempt)
    version = _append(name, release, [NewEvent("BuildClaimRenewed", {
        "app": name, "release": number, "builder": caller.host_id})], b.version, caller)
    return reply(schemas.Appended, {"stream": build_stream(name, release.stream_version),
                                    "version": version})


@route("/apps/<name>/releases/<int:number>/build/bundle", query=schemas.BuildAttempt,
       tag="builders", raw_response="application/gzip",
       errors=(400, 401, 403, 404, 409, 422))
def build_bundle(name: str, number: int) -> ResponseReturnValue:
    """The bundle of a build, for the builder holding its claim."""
    caller = _builder()
    _, release, _ = _held(name, number, caller, query(schemas.BuildAttempt)["attempt"])
    path = bundles.path_of(services().settings.bundles_dir, release.bundle_digest)
    if not path.exists():
        raise NotFound(f"the bundle of v{number} is missing from the bundle store")
    return send_file(path, mimetype="application/gzip", download_name=path.name,
                     etag=release.bundle_digest)


@route("/apps/<name>/releases/<int:number>/build/output", "POST", body=schemas.BuildOutput,
       response=schemas.Written, tag="builders", errors=(400, 401, 403, 404, 409, 413, 422))
def build_output(name: str, number: int) -> ResponseReturnValue:
    """More of a build's output, from the builder holding its claim (what `tally deploy`
    streams and `tally builds:output` shows)."""
    caller = _builder()
    req = body(schemas.BuildOutput)
    state, release, _ = _held(name, number, caller, req["attempt"])
    path = output_file(state, release)
    if path is not None:
        write_output(path, req["text"])
    return reply(schemas.Written, {"written": len(req["text"])})


@route("/apps/<name>/releases/<int:number>/build/failed", "POST", body=schemas.BuildFailure,
       response=schemas.Appended, tag="builders", errors=(400, 401, 403, 404, 409, 422))
def build_failed(name: str, number: int) -> ResponseReturnValue:
    """The builder holding the claim says the build failed, and why (BuildFailed)."""
    caller = _builder()
    req = body(schemas.BuildFailure)
    _, release, b = _held(name, number, caller, req["attempt"])
    version = _append(name, release, [NewEvent("BuildFailed", {
        "app": name, "release": number, "reason": req["reason"], "log_tail": req["log_tail"],
        "seconds": req["seconds"]})], b.version, caller)
    return reply(schemas.Appended, {"stream": build_stream(name, release.stream_version),
                                    "version": version})


@route("/apps/<name>/releases/<int:number>/build/slug", "PUT", query=schemas.SlugUpload,
       response=schemas.Appended, status=201, tag="builders", raw_body="application/octet-stream",
       errors=(400, 401, 403, 404, 409, 413, 422))
def upload_slug(name: str, number: int) -> ResponseReturnValue:
    """The slug a build made, from the builder holding the claim: stored by its sha256
    beside the bundles (within the app's slug_mb quota), then BuildSucceeded."""
    caller = _builder()
    req = query(schemas.SlugUpload)
    state, release, b = _held(name, number, caller, req["attempt"])
    limit = slug_limit(state)
    if (request.content_length or 0) > limit:
        raise TooLarge(f"slug larger than the limit of {limit} bytes (the slug_mb quota)",
                       quota="slug_mb")
    store = services().settings.bundles_dir
    upload, digest = bundles.receive(request.stream, store, limit, "slug", "slug_mb")
    with open(upload, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            os.unlink(upload)
            raise Unprocessable("a slug is a tar.gz", {"body": ["not gzip"]})
    size = upload.stat().st_size
    os.replace(upload, bundles.path_of(store, digest))
    version = _append(name, release, [NewEvent("BuildSucceeded", {
        "app": name, "release": number, "slug_digest": digest, "size_bytes": size,
        "seconds": req["seconds"]})], b.version, caller)
    return reply(schemas.Appended, {"stream": build_stream(name, release.stream_version),
                                    "version": version}, 201)
