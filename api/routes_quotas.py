"""Quotas: an admin sets how much one user (all their apps) or one app may use; the scale
and upload routes check them (api/quotas.py) before appending."""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue

from api import quotas, schemas
from api.auth import require_role
from api.errors import Forbidden, NotFound
from api.state import AppState
from api.web import body, reply, route, services, who
from ledger import NO_STREAM, NewEvent

SUBJECT_OF = {"users": "user", "apps": "app"}


def last_setting(subject: str, name: str) -> tuple[dict[str, Any] | None, int]:
    """The last QuotaSet payload of the subject (None: never set), and its stream version."""
    events = services().ledger.read_stream(quotas.stream(subject, name))
    return (events[-1].data, events[-1].version) if events else (None, NO_STREAM)


def quota_of(subject: str, name: str) -> quotas.Quota:
    setting, _ = last_setting(subject, name)
    return quotas.fold(subject, [setting] if setting else [])


def owner_usage(owner: str, except_app: str | None = None) -> tuple[int, int]:
    """(instances, memory MiB) the owner's apps ask for (but `except_app`)."""
    svc = services()
    instances = memory = 0
    for row in svc.views.apps():
        if row.get("owner") == owner and row["name"] != except_app:
            s = svc.read_app(row["name"])
            if s.exists and s.owner == owner:
                i, m = quotas.usage(s.scale, s.sizes)
                instances, memory = instances + i, memory + m
    return instances, memory


def check_scale(before: AppState, after_scale: dict[str, int],
                after_sizes: dict[str, str]) -> None:
    """The scale route's check: the app's and its owner's quotas."""
    owner = before.owner or ""
    quotas.check_scale(before.name, owner, quotas.usage(before.scale, before.sizes),
                       after_scale, after_sizes, quota_of("app", before.name),
                       quota_of("user", owner), owner_usage(owner, before.name))


def bundle_limits(state: AppState) -> tuple[int, int]:
    """(largest upload, largest unpacked size) in bytes for the app's next bundle."""
    return quotas.bundle_limits(quota_of("app", state.name), quota_of("user", state.owner or ""),
                                services().settings.max_bundle_bytes)


def _subject(kind: str, name: str) -> str:
    """Who may read a quota: admins; a user their own; an app's people the app's."""
    subject = SUBJECT_OF.get(kind)
    if subject is None:
        raise NotFound(f"no quotas for {kind!r}: use users or apps")
    caller = who()
    require_role(caller, "admin", "member")
    if subject == "user":
        if name not in services().directory(force=True).users:
            raise NotFound(f"no user named {name!r}")
        if not caller.is_admin and caller.name != name:
            raise Forbidden("only an admin or the user may see a user's quota")
    else:
        state = services().read_app(name)
        if not state.exists:
            raise NotFound(f"no app named {name!r}")
        if not caller.is_admin and not state.may_manage(caller.name):
            raise Forbidden(f"you are not the owner or a member of app {name}")
    return subject


def _view(subject: str, name: str) -> dict[str, Any]:
    if subject == "user":
        used = owner_usage(name)
    else:
        s = services().read_app(name)
        used = quotas.usage(s.scale, s.sizes)
    return quotas.as_dict(subject, name, quota_of(subject, name), used)


@route("/quotas/<kind>/<name>", response=schemas.Quota, tag="quotas",
       errors=(401, 403, 404))
def show_quota(kind: str, name: str) -> ResponseReturnValue:
    """A user's (`users`) or an app's (`apps`) limits and what it uses now."""
    return reply(schemas.Quota, _view(_subject(kind, name), name))


@route("/quotas/<kind>/<name>", "PUT", body=schemas.QuotaChange, response=schemas.Quota,
       tag="quotas", errors=(400, 401, 403, 404, 422))
def set_quota(kind: str, name: str) -> ResponseReturnValue:
    """Set some limits of a user or an app (admins only); null: back to the default."""
    require_role(who(), "admin")
    subject = _subject(kind, name)
    changes = body(schemas.QuotaChange)
    before, version = last_setting(subject, name)
    payload = quotas.setting(subject, name, before, changes)
    services().append(quotas.stream(subject, name), [NewEvent("QuotaSet", payload)], version,
                      who())
    return reply(schemas.Quota, _view(subject, name))
