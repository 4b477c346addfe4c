"""Endpoints of apps and what developers change on them: releases, scale, config, domains,
maintenance, members. Writes decide (api/decide.py) on the app folded from its stream and
append at that version (Services.command); reads of one app fold its stream, so a developer
reads their own write."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flask import Response, jsonify, request, send_file
from flask.typing import ResponseReturnValue

from api import bundles, decide, routes_quotas, schemas
from api.auth import require_role
from api.errors import Conflict, Forbidden, NotFound, TooLarge, Unavailable, Unprocessable
from api.state import Addon, AppState, release_dict, summary
from api.web import body, query, reply, route, services, who
from ledger import NO_STREAM, NewEvent, VersionConflict
from ledger.hostnames import platform_hostname

PEOPLE = ("admin", "member")


def app_state(name: str) -> AppState:
    """The app, if the caller may see it: 404 if there is none, 403 if not theirs."""
    require_role(who(), *PEOPLE)
    return authorized(services().read_app(name))


def authorized(state: AppState) -> AppState:
    caller = who()
    decide.require_app(state)
    if not caller.is_admin and not state.may_manage(caller.name):
        raise Forbidden(f"you are not the owner or a member of app {state.name}")
    return state


def owned(state: AppState) -> AppState:
    """Deleting an app and choosing who manages it are its owner's (or an admin's), as on
    Heroku: members deploy, scale and configure, but cannot lock the owner out. For
    deciders run by `change`, which has checked `authorized` already."""
    caller = who()
    if not caller.is_admin and caller.name != state.owner:
        raise Forbidden(f"only {state.name}'s owner ({state.owner}) or an admin may do this")
    return state


def change(name: str, fn: Callable[[AppState], list[NewEvent]]) -> AppState:
    """Load, check access, decide, append: one read of the app."""
    require_role(who(), *PEOPLE)
    return services().command(name, who(), lambda s: fn(authorized(s)))


# --- apps -----------------------------------------------------------------------------------


@route("/apps", "POST", body=schemas.AppCreate, response=schemas.App, status=201, tag="apps",
       errors=(400, 401, 403, 409, 422))
def create_app() -> ResponseReturnValue:
    """Create an app; its name is a Heroku-like slug (a deleted app's name stays its
    last owner's: the history under it is theirs)."""
    require_role(who(), *PEOPLE)
    name = body(schemas.AppCreate)["name"]
    svc = services()
    with claimed(platform_hostname(name, svc.suffix()), name):
        decide.create_app(svc.load_app(name), who().name)  # refused: no uid spent on it
        uid = svc.allocate_uid(name, who())
        state = svc.command(name, who(), lambda s: decide.create_app(s, who().name, uid))
    return reply(schemas.App, summary(state), 201)


@route("/apps", response=schemas.AppList, tag="apps", errors=(401, 403))
def list_apps() -> ResponseReturnValue:
    """The apps the caller may manage (every app for an admin), from the apps view."""
    caller = who()
    require_role(caller, *PEOPLE)
    svc = services()
    rows = svc.views.apps()
    if not caller.is_admin:
        directory = svc.directory(force=True)
        rows = [r for r in rows if directory.manages(caller.name, r["name"])]
    return reply(schemas.AppList, {"apps": rows})


@route("/apps/<name>", response=schemas.App, tag="apps", errors=(401, 403, 404))
def show_app(name: str) -> ResponseReturnValue:
    """One app: owner, members, current release, scale, domains, maintenance."""
    state = app_state(name)
    hit = _SHOWN.get(name)
    if hit is None or hit[0] is not state:
        if len(_SHOWN) >= 10_000:
            _SHOWN.clear()
        shown = {**summary(state), "web_url": web_url(name)}
        hit = _SHOWN[name] = (state, jsonify(schemas.App().dump(shown)).get_data())
    return Response(hit[1], mimetype="application/json")


def web_url(name: str) -> str:
    """Where the balancers serve the app: its platform hostname, on their public port."""
    port = services().settings.web_port
    host = platform_hostname(name, services().suffix())
    return f"http://{host}{'' if port in (None, 80) else f':{port}'}/"


_SHOWN: dict[str, tuple[AppState, bytes]] = {}
"""The JSON of each app's last folded state: the busiest read serialises once a version."""


@route("/apps/<name>", "DELETE", tag="apps", status=204, errors=(401, 403, 404, 409))
def delete_app(name: str) -> ResponseReturnValue:
    """Delete an app: everything stops, its domains and platform name are freed, its own
    add-ons are destroyed (detached from its owner's other apps, database and role dropped,
    Redis removed), its history stays."""
    freed: list[str] = [platform_hostname(name, services().suffix())]
    bundled: list[str] = []
    addons: list[Addon] = []

    def delete(s: AppState) -> list[NewEvent]:
        owned(s)
        freed[1:] = s.domains  # the domains of the state the deletion is decided on
        bundled[:] = [r.bundle_digest for r in s.releases]
        addons[:] = [a for a in s.addons if a.owner == s.name]
        return decide.delete_app(s)
    deleted = change(name, delete)
    gone(deleted, addons)
    for domain in freed:
        release_claim(domain, name)
    svc = services()  # its bundles, unless another app's release needs one (best effort)
    bundles.prune(svc.settings.bundles_dir, bundled, svc.views.bundles_in_use(name))
    return Response(status=204)


@route("/apps/<name>/members", "POST", body=schemas.MemberAdd, response=schemas.App,
       tag="apps", errors=(400, 401, 403, 404, 422))
def add_member(name: str) -> ResponseReturnValue:
    """Let another user manage the app (the owner or an admin)."""
    user = body(schemas.MemberAdd)["user"]
    if user not in services().directory(force=True).users:
        raise NotFound(f"no user named {user!r}")
    return reply(schemas.App, summary(change(name, lambda s: decide.add_member(owned(s), user))))


@route("/apps/<name>/members/<user>", "DELETE", response=schemas.App, tag="apps",
       errors=(401, 403, 404))
def remove_member(name: str, user: str) -> ResponseReturnValue:
    """Stop a user managing the app (the owner or an admin; a member may leave)."""

    def remove(s: AppState) -> list[NewEvent]:
        if user != who().name:
            owned(s)
        return decide.remove_member(s, user)
    return reply(schemas.App, summary(change(name, remove)))


# --- releases -------------------------------------------------------------------------------


@route("/apps/<name>/releases", "POST", query=schemas.ReleaseQuery, response=schemas.Release,
       status=201, tag="releases", raw_body="application/octet-stream",
       errors=(400, 401, 403, 404, 409, 413, 422))
def upload_release(name: str) -> ResponseReturnValue:
    """Upload a bundle (the request body: a tar.gz with Procfile and requirements.txt);
    it becomes the next release."""
    args = query(schemas.ReleaseQuery)
    limit, unpacked = routes_quotas.bundle_limits(app_state(name))
    svc = services()
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"bundle larger than the limit of {limit} bytes (the bundle_mb quota)",
                       quota="bundle_mb")
    upload, digest = bundles.receive(request.stream, svc.settings.bundles_dir, limit)
    try:
        if args["digest"] and args["digest"] != digest:
            raise Unprocessable(f"bundle digest mismatch: sent {args['digest'][:12]}..., "
                                f"received {digest[:12]}... (the upload was damaged)",
                                {"digest": ["mismatch"]})
        procfile = bundles.inspect(upload, unpacked)
        known = bundles.path_of(svc.settings.bundles_dir, digest).exists()
        bundles.store(upload, digest, svc.settings.bundles_dir)
    finally:
        upload.unlink(missing_ok=True)
    try:
        state = svc.command(name, who(), lambda s: decide.new_release(s, digest, procfile,
                                                                       args["description"]))
    except Exception:
        if not known:  # stored for nothing: no release names it
            bundles.path_of(svc.settings.bundles_dir, digest).unlink(missing_ok=True)
        raise
    return reply(schemas.Release, release_dict(state.releases[-1]), 201)


@route("/apps/<name>/releases", response=schemas.ReleaseList, tag="releases",
       errors=(401, 403, 404))
def list_releases(name: str) -> ResponseReturnValue:
    """Every release, newest first, with its rollout status (pending, deployed,
    superseded, failed: from the releases view) and why it failed."""
    state = app_state(name)
    statuses = services().views.release_statuses(name)
    releases = []
    for r in reversed(state.releases):
        status, reason = statuses.get(r.number, ("pending", None))
        releases.append({**release_dict(r), "status": status, "failure_reason": reason})
    return reply(schemas.ReleaseList, {"releases": releases})


@route("/apps/<name>/releases/<int:number>", response=schemas.Release, tag="releases",
       errors=(401, 403, 404))
def show_release(name: str, number: int) -> ResponseReturnValue:
    """One release."""
    found = app_state(name).release(number)
    if found is None:
        raise NotFound(f"app {name} has no release v{number}")
    return reply(schemas.Release, release_dict(found))


def release_reader_state(name: str, number: int) -> AppState:
    """The app's state for a caller who may read release `number`'s files: its people, or
    the agent of a host the release is placed on or runs a one-off command of (403 else)."""
    caller = who()
    svc = services()
    if caller.role != "agent":
        return app_state(name)
    state = svc.load_app(name)
    if not caller.host_id or not (running_on(state, number, caller.host_id) or
                                  svc.placements().placed_here(caller.host_id, name, number)):
        raise Forbidden(f"release v{number} of {name} is not placed on this host")
    return state


@route("/apps/<name>/releases/<int:number>/bundle", tag="releases",
       raw_response="application/gzip", errors=(401, 403, 404))
def download_bundle(name: str, number: int) -> ResponseReturnValue:
    """The release's bundle: for the app's people, and for agents of hosts it is placed on
    or that run a one-off command of it."""
    state = release_reader_state(name, number)
    found = state.release(number)
    if found is None:
        raise NotFound(f"app {name} has no release v{number}")
    path = bundles.path_of(services().settings.bundles_dir, found.bundle_digest)
    if not path.exists():
        raise NotFound(f"the bundle of v{number} is missing from the bundle store")
    return send_file(path, mimetype="application/gzip", download_name=path.name,
                     etag=found.bundle_digest)


def failed_releases(name: str) -> set[int]:
    """Releases whose build or rollout failed (the releases view): never built on again."""
    return {n for n, (status, _) in services().views.release_statuses(name).items()
            if status == "failed"}


def running_on(state: AppState, number: int, host_id: str) -> bool:
    """Whether a one-off run of this release goes on on this host (the API chose it: its
    agent is granted the bundle, as one running the release is)."""
    return any(r.release == number and r.host_id == host_id and not r.ended
               for r in state.runs)


@route("/apps/<name>/rollback", "POST", body=schemas.Rollback, response=schemas.Release,
       status=201, tag="releases", errors=(400, 401, 403, 404, 409, 422))
def rollback(name: str) -> ResponseReturnValue:
    """A new release with an earlier release's bundle and config."""
    target = body(schemas.Rollback)["release"]
    failed = failed_releases(name)
    state = change(name, lambda s: decide.rollback(s, target, failed))
    return reply(schemas.Release, release_dict(state.releases[-1]), 201)


# --- scale, config, domains, maintenance ----------------------------------------------------


@route("/apps/<name>/scale", "POST", body=schemas.ScaleRequest, response=schemas.App,
       tag="apps", errors=(400, 401, 403, 404, 409, 422))
def scale(name: str) -> ResponseReturnValue:
    """Set the number of instances of some process types (`{"scale": {"web": 2}}`)."""
    asked = body(schemas.ScaleRequest)

    def scale(s: AppState) -> list[NewEvent]:
        events = decide.scale(s, asked["scale"], asked["sizes"])
        after = events[0].data
        routes_quotas.check_scale(s, after["scale"], after.get("sizes", {}))
        return events
    return reply(schemas.App, summary(change(name, scale)))


@route("/apps/<name>/config", response=schemas.Config, tag="config", errors=(401, 403, 404))
def show_config(name: str) -> ResponseReturnValue:
    """The config vars with their values (only the app's people and admins see them)."""
    state = app_state(name)
    return reply(schemas.Config, {"config": state.config,
                                  "config_version": state.config_version})


@route("/apps/<name>/config", "PATCH", body=schemas.ConfigChange, response=schemas.Config,
       tag="config", errors=(400, 401, 403, 404, 409, 422))
def change_config(name: str) -> ResponseReturnValue:
    """Set and unset config vars; a new release follows once the app has code."""
    req = body(schemas.ConfigChange)
    failed = failed_releases(name)
    state = change(name, lambda s: decide.change_config(s, req["set"], req["unset"], failed))
    return reply(schemas.Config, {"config": state.config,
                                  "config_version": state.config_version,
                                  "release": state.current.number if state.current else None})


@route("/apps/<name>/domains", response=schemas.Domains, tag="domains",
       errors=(401, 403, 404))
def list_domains(name: str) -> ResponseReturnValue:
    """The app's hostnames."""
    return reply(schemas.Domains, {"domains": list(app_state(name).domains)})


@route("/apps/<name>/domains", "POST", body=schemas.DomainAdd, response=schemas.Domains,
       status=201, tag="domains", errors=(400, 401, 403, 404, 409, 422))
def add_domain(name: str) -> ResponseReturnValue:
    """Route a hostname (exact, or `*.suffix`) to the app; a name has one app at most."""
    domain = decide.normalise_domain(body(schemas.DomainAdd)["domain"])
    state = app_state(name)
    suffix = services().suffix()
    decide.add_domain(state, domain, suffix)
    with claimed(domain, name):
        state = services().command(name, who(), lambda s: decide.add_domain(s, domain, suffix))
    return reply(schemas.Domains, {"domains": list(state.domains)}, 201)


@route("/apps/<name>/domains/<domain>", "DELETE", response=schemas.Domains, tag="domains",
       errors=(401, 403, 404, 409, 422))
def remove_domain(name: str, domain: str) -> ResponseReturnValue:
    """Stop routing a hostname to the app."""
    domain = decide.normalise_domain(domain)
    state = change(name, lambda s: decide.remove_domain(s, domain))
    release_claim(domain, name)
    return reply(schemas.Domains, {"domains": list(state.domains)})


@contextmanager
def claimed(domain: str, app: str) -> Iterator[None]:
    """Hold the hostname's claim for what follows; give back one taken here if it fails."""
    taken = claim(domain, app)
    try:
        yield
    except BaseException:
        if taken:
            release_claim(domain, app)
        raise


def claim(domain: str, app: str) -> bool:
    """Take the hostname's claim stream at the version read: two apps racing for one name
    cannot both win. False if the app holds it already (a request that died between the
    claim and DomainAdded left it so; it is the app's to use)."""
    svc = services()
    stream = decide.domain_stream(domain)
    events = svc.ledger.read_stream(stream)
    holder = decide.claim_holder([(e.type, e.data["app"]) for e in events])
    if holder == app:
        return False
    if holder is not None:
        raise Conflict(f"{domain} is already used by another app", {"domain": ["taken"]})
    try:
        svc.append(stream, [NewEvent("DomainClaimed", {"domain": domain, "app": app})],
                   len(events) or NO_STREAM, who())
    except VersionConflict as exc:
        raise Conflict(f"{domain} was claimed by another request meanwhile",
                       {"domain": ["taken"]}) from exc
    return True


def release_claim(domain: str, app: str) -> None:
    svc = services()
    stream = decide.domain_stream(domain)
    events = svc.ledger.read_stream(stream)
    if decide.claim_holder([(e.type, e.data["app"]) for e in events]) == app:
        svc.append(stream, [NewEvent("DomainReleased", {"domain": domain, "app": app})],
                   len(events), who())


@route("/apps/<name>/maintenance", "PUT", body=schemas.Maintenance, response=schemas.App,
       tag="apps", errors=(400, 401, 403, 404, 409, 422))
def maintenance(name: str) -> ResponseReturnValue:
    """Switch maintenance mode: the balancers answer 503 with a page, instances keep running."""
    enabled = body(schemas.Maintenance)["enabled"]
    return reply(schemas.App, summary(change(name,
                                             lambda s: decide.set_maintenance(s, enabled))))


def _detaching(addon: str, failed: set[int]) -> Callable[[AppState], list[NewEvent]]:
    """Detach `addon` from an app that still has it attached (none: nothing to do)."""
    return lambda s: decide.detach_addon(s, addon, failed) if s.addon(addon) else []


def gone(owner: AppState, destroyed: list[Addon]) -> None:
    """After the owner's AddonDestroyed: detach the add-ons from the owner's other apps
    (only those may attach them), then take each one's final backup and drop it, each
    AddonDropped once gone. A drop (or its final backup) that fails is a 503 saying so: the
    ledger already says destroyed, and the add-ons' reaper (agents/addonreaper.py) retries
    it from there."""
    if not destroyed:
        return
    svc = services()
    siblings = [app for app, people in svc.directory(force=True).managers.items()
                if owner.owner in people and app != owner.name]  # then checked: owner
    for app in siblings:
        for addon in destroyed:
            if svc.load_app(app).addon(addon.name):
                failed = failed_releases(app)
                svc.command(app, who(), _detaching(addon.name, failed))
    drop, backups = svc.settings.destroy_addon, svc.settings.addon_backups
    for addon in destroyed:
        if drop is None:
            continue
        try:
            if backups is not None:  # the final backup first: nothing is dropped without it
                backups.final(owner.name, addon.kind)
            drop(addon.kind, owner.name)
        except Exception as exc:
            raise Unavailable(f"{addon.name} is destroyed, but dropping it failed: {exc}; "
                              "its credentials may still work until it is dropped (the "
                              "add-ons' reaper, tally serve addons, retries)") from exc
        svc.append(f"app-{owner.name}", [NewEvent("AddonDropped", {
            "app": owner.name, "addon": addon.name, "kind": addon.kind, "by": "api"})],
            None, who())
