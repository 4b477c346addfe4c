"""Endpoints of users and their tokens: who one is, creating users, issuing and revoking
tokens (people for themselves, admins for anyone)."""

from __future__ import annotations

from flask import Response
from flask.typing import ResponseReturnValue

from api import auth, schemas
from api.auth import require_role
from api.errors import Conflict, Forbidden, NotFound, Unprocessable
from api.web import body, reply, route, services, who
from ledger import NO_STREAM, NewEvent, VersionConflict


@route("/me", response=schemas.User, tag="users", errors=(401,))
def me() -> ResponseReturnValue:
    """Who the token belongs to (what `tally login` checks)."""
    caller = who()
    return reply(schemas.User, {"name": caller.name, "role": caller.role,
                                "host_id": caller.host_id, "token_ids": [caller.token_id]})


@route("/users", response=schemas.Rows, tag="users", errors=(401, 403))
def list_users() -> ResponseReturnValue:
    """Every user and their token ids (admins only)."""
    require_role(who(), "admin")
    d = services().directory(force=True)
    items = [{"name": u.name, "role": u.role, "host_id": u.host_id,
              "token_ids": d.token_ids(u.name)} for u in sorted(d.users.values(),
                                                                 key=lambda u: u.name)]
    return reply(schemas.Rows, {"items": items})


@route("/users", "POST", body=schemas.UserCreate, response=schemas.Token, status=201,
       tag="users", errors=(400, 401, 403, 409, 422))
def create_user() -> ResponseReturnValue:
    """Create a user (admin, member, or an agent, balancer or builder bound to a host)
    with a first token."""
    require_role(who(), "admin")
    req = body(schemas.UserCreate)
    if problem := auth.host_binding_problem(req["role"], req["host_id"]):
        raise Unprocessable(problem, {"host_id": ["required for agents, balancers and "
                                                  "builders only"]})
    token, events = auth.user_events(req["name"], req["role"], req["host_id"])
    try:
        services().append(f"user-{req['name']}", events, NO_STREAM, who())
    except VersionConflict as exc:
        raise Conflict(f"a user named {req['name']!r} exists", {"name": ["taken"]}) from exc
    return reply(schemas.Token, {"user": req["name"], "role": req["role"],
                                 "token_id": events[1].data["token_id"], "token": token}, 201)


def _self_or_admin(name: str) -> auth.Principal:
    caller = who()
    if not caller.is_admin and caller.name != name:
        raise Forbidden("only an admin may manage another user's tokens")
    user = services().directory(force=True).users.get(name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


@route("/users/<name>/tokens", "POST", body=schemas.TokenCreate, response=schemas.Token,
       status=201, tag="users", errors=(400, 401, 403, 404, 422))
def issue_token(name: str) -> ResponseReturnValue:
    """Issue another token for a user (yourself, or anyone as an admin; an agent's tokens
    only as an admin: a stolen agent token must not outlive its revocation)."""
    require_role(who(), "admin", "member")
    user = _self_or_admin(name)
    label = body(schemas.TokenCreate)["label"]
    token, issued = auth.token_event(name, label)
    services().append(f"user-{name}", [issued], None, who())
    return reply(schemas.Token, {"user": name, "role": user.role,
                                 "token_id": issued.data["token_id"], "token": token}, 201)


@route("/users/<name>/tokens/<token_id>", "DELETE", tag="users", status=204,
       errors=(401, 403, 404))
def revoke_token(name: str, token_id: str) -> ResponseReturnValue:
    """Revoke a token: it opens nothing from now on."""
    _self_or_admin(name)
    if token_id not in services().directory().token_ids(name):
        raise NotFound(f"{name} has no live token {token_id!r}")
    services().append(f"user-{name}", [NewEvent("TokenRevoked", {
        "user": name, "token_id": token_id})], None, who())
    services().directory(force=True)
    return Response(status=204)
