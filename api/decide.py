"""Command decisions: given an app's folded state and a request, the events to append, or
the reason to refuse. Pure functions, unit-tested without PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Collection

from api.errors import Conflict, NotFound, Unprocessable
from api.state import AppState, Release
from ledger.events import NewEvent
from ledger.hostnames import reserved
from ledger.tls import https_config_error
from ledger.vocabulary import default_scale

HOSTNAME = re.compile(
    r"^(\*\.)?(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)
CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def require_app(s: AppState) -> None:
    if not s.exists:
        raise NotFound(f"no app named {s.name!r}")


def create_app(s: AppState, owner: str, uid: int | None = None) -> list[NewEvent]:
    """A deleted app's name may be taken again by its last owner only: its history (config
    values, events, logs) stays readable to whoever manages an app of that name."""
    if s.exists:
        raise Conflict(f"the name {s.name!r} is already taken")
    if s.deleted and s.owner != owner:
        raise Conflict(f"the name {s.name!r} belonged to a deleted app: only its last owner "
                       "may use it again")
    return [NewEvent("AppCreated", {"name": s.name, "owner": owner, "uid": uid})]


def delete_app(s: AppState) -> list[NewEvent]:
    """Deleting stops everything (the scale drops to zero), destroys its own add-ons and
    detaches the others, and keeps the history."""
    require_app(s)
    events = [NewEvent("DomainRemoved", {"app": s.name, "domain": d}) for d in s.domains]
    for a in s.addons:
        gone = {"app": s.name, "addon": a.name, "kind": a.kind}
        events.append(NewEvent("AddonDestroyed", {**gone, "reason": "the app was deleted"})
                      if a.owner == s.name else
                      NewEvent("AddonDetached", {**gone, "config_var": a.config_var}))
    return [*events, NewEvent("AppDeleted", {"name": s.name})]


def new_release(s: AppState, digest: str, procfile: dict[str, str],
                description: str) -> list[NewEvent]:
    """A release of a freshly uploaded bundle with the current config. The first release
    records the default scale of its process types (`web`: 1, as on Heroku), so the scale
    the placer acts on is in the ledger."""
    require_app(s)
    number = len(s.releases) + 1
    events = [NewEvent("ReleaseCreated", {
        "app": s.name, "release": number, "bundle_digest": digest, "procfile": procfile,
        "config_version": s.config_version, "description": description[:500],
    })]
    defaults = {t: n for t in procfile if (n := default_scale(t))}
    if not s.releases and not s.scale and defaults:
        events.append(NewEvent("ScaleChanged", {"app": s.name, "scale": defaults}))
    return events


def scale(s: AppState, changes: dict[str, int],
          sizes: dict[str, str] | None = None) -> list[NewEvent]:
    """Only process types of the current release's Procfile can be scaled (and sized: a
    type given a size keeps it until given another)."""
    require_app(s)
    if s.current is None:
        raise Unprocessable(f"app {s.name!r} has no release yet: deploy first")
    unknown = sorted(set(changes) - set(s.current.procfile))
    if unknown:
        known = ", ".join(sorted(s.current.procfile))
        raise Unprocessable(
            f"no process type {', '.join(unknown)} in the Procfile of v{s.current.number} "
            f"(it has: {known})", {"scale": {u: ["not in the Procfile"] for u in unknown}})
    unknown = sorted(set(sizes or {}) - set(s.current.procfile))
    if unknown:
        raise Unprocessable(f"no process type {', '.join(unknown)} to size in the Procfile of "
                            f"v{s.current.number}", {"sizes": {u: ["not in the Procfile"]
                                                               for u in unknown}})
    data: dict[str, object] = {"app": s.name, "scale": {**s.scale, **changes}}
    if sizes or s.sizes:
        data["sizes"] = {**s.sizes, **(sizes or {})}
    return [NewEvent("ScaleChanged", data)]


def last_good(s: AppState, failed: Collection[int], below: int | None = None
              ) -> Release | None:
    """The newest release that did not fail (below `below` if given): what a config change
    or a rollback builds on, never a failed release."""
    return next((r for r in reversed(s.releases) if r.number not in failed
                 and (below is None or r.number < below)), None)


def change_config(s: AppState, set_: dict[str, str], unset: list[str],
                  failed: Collection[int] = ()) -> list[NewEvent]:
    """Each config change is a new config version and, once there is code that did not
    fail, a new release of that code."""
    require_app(s)
    bad = [k for k in [*set_, *unset] if not CONFIG_KEY.fullmatch(k)]  # `$` allows "K\n"
    if bad:
        raise Unprocessable(f"invalid config var name {bad[0]!r}: use letters, digits, _",
                            {"set": {k: ["invalid name"] for k in bad}})
    if not set_ and not unset:
        raise Unprocessable("nothing to change: give vars to set or unset")
    for k, v in set_.items():  # the balancers' HTTPS settings (ledger/tls.py)
        if (why := https_config_error(k, v)) is not None:
            raise Unprocessable(why, {"set": {k: [why]}})
    version = max(s.configs) + 1
    events = [NewEvent("ConfigChanged", {"app": s.name, "set": set_, "unset": unset,
                                         "config_version": version})]
    if base := last_good(s, failed):
        changed = ", ".join([*(f"set {k}" for k in set_), *(f"unset {k}" for k in unset)])
        if base is not s.current:
            changed += f" (on v{base.number}: later releases failed)"
        events.append(_release_of(s, base.bundle_digest, base.procfile, version, changed,
                                  None))
    return events


def rollback(s: AppState, target: int | None, failed: Collection[int] = ()) -> list[NewEvent]:
    """A new release with an earlier release's bundle and config (default: the newest
    earlier one that did not fail)."""
    require_app(s)
    if s.current is None:
        raise Unprocessable(f"app {s.name!r} has no release to roll back")
    previous = last_good(s, failed, below=s.current.number)
    number = target if target is not None else (previous.number if previous else 0)
    old = s.release(number)
    if old is None or number >= s.current.number:
        raise Unprocessable(f"no earlier release v{number} to roll back to",
                            {"release": ["not an earlier release"]})
    events: list[NewEvent] = []
    config_version = s.config_version
    wanted = s.configs[old.config_version]
    if wanted != s.config:
        config_version = max(s.configs) + 1
        unset = sorted(set(s.config) - set(wanted))
        events.append(NewEvent("ConfigChanged", {"app": s.name, "set": wanted, "unset": unset,
                                                 "config_version": config_version}))
    events.append(_release_of(s, old.bundle_digest, old.procfile, config_version,
                              f"rollback to v{number}", number))
    return events


def _release_of(s: AppState, digest: str, procfile: dict[str, str], config_version: int,
                description: str, rollback_of: int | None) -> NewEvent:
    return NewEvent("ReleaseCreated", {
        "app": s.name, "release": len(s.releases) + 1, "bundle_digest": digest,
        "procfile": procfile, "config_version": config_version,
        "description": description[:500], "rollback_of": rollback_of,
    })


def normalise_domain(domain: str) -> str:
    """Lowercase, no trailing dot; exact hostnames or `*.suffix`. Raises Unprocessable."""
    d = domain.strip().lower().rstrip(".")
    if not HOSTNAME.match(d):
        raise Unprocessable(f"{domain!r} is not a hostname or *.suffix",
                            {"domain": ["must be a hostname like www.example.com or "
                                        "*.example.com"]})
    return d


def domain_stream(domain: str) -> str:
    """The stream holding the one live claim on a hostname."""
    if domain.startswith("*."):
        return f"domain-wildcard:{domain[2:]}"
    return f"domain-{domain}"


def add_domain(s: AppState, domain: str, suffix: str) -> list[NewEvent]:
    """A custom domain, never one under the platform's own suffix nor a wildcard covering
    it: those names are the platform's, each app's claimed by the app itself."""
    require_app(s)
    if reserved(domain, suffix):
        raise Unprocessable(f"{domain} is reserved: names under {suffix} are the platform's "
                            f"(each app answers at <app>.{suffix})",
                            {"domain": [f"under or covering the platform suffix {suffix}"]})
    if domain in s.domains:
        raise Conflict(f"{domain} is already a domain of {s.name}")
    return [NewEvent("DomainAdded", {"app": s.name, "domain": domain})]


def remove_domain(s: AppState, domain: str) -> list[NewEvent]:
    require_app(s)
    if domain not in s.domains:
        raise NotFound(f"{domain} is not a domain of {s.name}")
    return [NewEvent("DomainRemoved", {"app": s.name, "domain": domain})]


def claim_holder(claims: list[tuple[str, str]]) -> str | None:
    """Who holds a domain, from its stream's (type, app) events in order."""
    holder = None
    for type_, app in claims:
        holder = app if type_ == "DomainClaimed" else None
    return holder


def set_maintenance(s: AppState, enabled: bool) -> list[NewEvent]:
    require_app(s)
    if s.maintenance == enabled:
        return []
    return [NewEvent("MaintenanceChanged", {"app": s.name, "enabled": enabled})]


def add_member(s: AppState, user: str) -> list[NewEvent]:
    require_app(s)
    if s.may_manage(user):
        return []
    return [NewEvent("AppMemberAdded", {"app": s.name, "user": user})]


def remove_member(s: AppState, user: str) -> list[NewEvent]:
    require_app(s)
    if user not in s.members:
        raise NotFound(f"{user} is not a member of {s.name}")
    return [NewEvent("AppMemberRemoved", {"app": s.name, "user": user})]


# --- add-ons ----------------------------------------------------------------------------------

ADDON_VARS = {"postgresql": "DATABASE_URL", "redis": "REDIS_URL"}
"""Each kind of add-on and the config var through which its own app reaches it."""


def addon_name(kind: str, app: str) -> str:
    return f"{kind}-{app}"


def check_new_addon(s: AppState, kind: str) -> str:
    """The add-on `kind` the app may get (one of each kind per app, and its config var
    free); its name. Refused before anything is made."""
    require_app(s)
    var = ADDON_VARS[kind]
    if s.addon(addon_name(kind, s.name)):
        raise Conflict(f"{s.name} already has {addon_name(kind, s.name)}",
                       {"kind": ["exists"]})
    if var in s.config:
        raise Conflict(f"{s.name} already has a {var}", {"kind": ["exists"]})
    if addon_name(kind, s.name) in s.undropped:
        raise Conflict(f"the earlier {addon_name(kind, s.name)} is destroyed but not dropped "
                       f"yet: the add-ons' reaper (tally serve addons) retries the drop, "
                       f"then it can be made again", {"kind": ["being dropped"]})
    return addon_name(kind, s.name)


def create_addon(s: AppState, kind: str, plan: str, url: str, where: str,
                 failed: Collection[int] = ()) -> list[NewEvent]:
    """The app's own new add-on, and its config var set (a new release)."""
    name = check_new_addon(s, kind)
    var = ADDON_VARS[kind]
    return [NewEvent("AddonCreated", {"app": s.name, "addon": name, "kind": kind,
                                      "plan": plan, "config_var": var, "where": where}),
            *change_config(s, {var: url}, [], failed)]


def attach_var(kind: str, alias: str | None) -> str:
    """The config var an attachment sets: `ALIAS_URL` (Heroku's `--as`), else the kind's."""
    if not alias:
        return ADDON_VARS[kind]
    var = alias.upper()
    return var if var.endswith("_URL") else var + "_URL"


def attach_addon(s: AppState, source: AppState, addon: str, alias: str | None,
                 failed: Collection[int] = ()) -> list[NewEvent]:
    """App `s` reaches `source`'s add-on under a config var of its own: only between apps
    of one owner (members of one app must not reach another owner's data)."""
    require_app(s)
    own = source.addon(addon)
    if own is None or own.owner != source.name:
        raise NotFound(f"{source.name} has no add-on named {addon!r}")
    if source.owner != s.owner:
        raise Conflict(f"{s.name} and {source.name} have different owners: an add-on is "
                       "shared only between apps of one owner")
    if s.name == source.name or s.addon(addon):
        raise Conflict(f"{s.name} already reaches {addon}")
    var = attach_var(own.kind, alias)
    if var in s.config:
        raise Conflict(f"{s.name} already has a {var}: choose another name with --as")
    return [NewEvent("AddonAttached", {"app": s.name, "addon": addon, "kind": own.kind,
                                       "owner": source.name, "plan": own.plan,
                                       "config_var": var, "where": own.where}),
            *change_config(s, {var: source.config[own.config_var]}, [], failed)]


def detach_addon(s: AppState, addon: str, failed: Collection[int] = ()) -> list[NewEvent]:
    """The app stops reaching another app's add-on (its own are destroyed, not detached)."""
    require_app(s)
    use = s.addon(addon)
    if use is None:
        raise NotFound(f"{s.name} has no add-on named {addon!r}")
    if use.owner == s.name:
        raise Conflict(f"{addon} is {s.name}'s own: destroy it with addons:destroy")
    return [NewEvent("AddonDetached", {"app": s.name, "addon": addon, "kind": use.kind,
                                       "config_var": use.config_var}),
            *change_config(s, {}, [use.config_var], failed)]


def destroy_addon(s: AppState, addon: str, reason: str,
                  failed: Collection[int] = ()) -> list[NewEvent]:
    """The app's own add-on destroyed, its config var unset (a new release)."""
    require_app(s)
    use = s.addon(addon)
    if use is None:
        raise NotFound(f"{s.name} has no add-on named {addon!r}")
    if use.owner != s.name:
        raise Conflict(f"{addon} belongs to {use.owner}: detach it with addons:detach")
    return [NewEvent("AddonDestroyed", {"app": s.name, "addon": addon, "kind": use.kind,
                                        "reason": reason}),
            *change_config(s, {}, [use.config_var], failed)]
