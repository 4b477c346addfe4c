"""Who is asking: users, roles and tokens, folded from the ledger's `user-*` streams.

Tokens are random 32-byte strings shown once; only their sha256 is ever stored (in
TokenIssued events). Roles: admin (everything), member (apps they own or were added to),
agent (bound to one host: its heartbeats, its instances' events, its placements' bundles),
balancer (bound to one balancer host: it reads the routing table and nothing else),
builder (bound to its name: the build queue, and the builds it claimed).
The Directory is a pure fold; api/services.py keeps one per process fresh from the ledger.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from api.errors import Forbidden, Unauthorized
from ledger import NO_STREAM, Ledger, LedgerError
from ledger.events import NewEvent, RecordedEvent
from ledger.rules import members_after

ROLES = ("admin", "member", "agent", "balancer", "builder")
HOST_ROLES = ("agent", "balancer", "builder")
"""Roles bound to one host (a token acts for that host only)."""


def host_binding_problem(role: str, host_id: str | None) -> str | None:
    """Why a user of `role` cannot have this host binding; None when it can. Agents,
    balancers and builders act for one host, and only they are bound to one."""
    if (role in HOST_ROLES) != bool(host_id):
        return "an agent, balancer or builder needs a host, and only they have one"
    return None
"""Roles of fleet daemons: each token is bound to one host (a builder's name)."""
FOLDED = ["UserCreated", "TokenIssued", "TokenRevoked", "AppCreated", "AppDeleted",
          "AppMemberAdded", "AppMemberRemoved"]
"""The event types a Directory folds (read with one filtered query)."""
TOKEN_PREFIX = "tly_"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    name: str
    role: str
    host_id: str | None = None
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Directory:
    """Users and live token hashes, as of ledger position `position`."""

    users: dict[str, Principal] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # hash -> (user, id)
    managers: dict[str, frozenset[str]] = field(default_factory=dict)
    """app -> its owner and members (ledger.rules.members_after)."""
    versions: dict[str, int] = field(default_factory=dict)  # user -> their stream's version
    position: int = 0

    def apply(self, events: Iterable[RecordedEvent]) -> None:
        for ev in events:
            d = ev.data
            if ev.type == "UserCreated":
                self.users[d["name"]] = Principal(d["name"], d["role"], d.get("host_id"))
            elif ev.type == "TokenIssued":
                self.tokens[d["token_hash"]] = (d["user"], d["token_id"])
            elif ev.type == "TokenRevoked":
                self.tokens = {h: v for h, v in self.tokens.items()
                               if v != (d["user"], d["token_id"])}
            elif ev.type == "AppCreated":
                self.managers[d["name"]] = frozenset({d["owner"]})
            elif ev.type == "AppDeleted":
                self.managers.pop(d["name"], None)
            elif ev.type in ("AppMemberAdded", "AppMemberRemoved") and d["app"] in self.managers:
                self.managers[d["app"]] = members_after(self.managers[d["app"]], ev.type,
                                                        d["user"])
            if ev.stream.startswith("user-"):
                user = ev.stream[5:]
                self.versions[user] = max(self.versions.get(user, 0), ev.version)
            if ev.position:
                self.position = max(self.position, ev.position)

    def lookup(self, token: str) -> Principal | None:
        found = self.tokens.get(hash_token(token))
        if found is None or found[0] not in self.users:
            return None
        user = self.users[found[0]]
        return Principal(user.name, user.role, user.host_id, found[1])

    def revoked_since(self, who: Principal, later: Iterable[RecordedEvent]) -> bool:
        """Whether these events of the caller's stream, recorded after this directory's
        last fold of it, revoke the caller's token."""
        return any(e.type == "TokenRevoked" and e.data["token_id"] == who.token_id
                   for e in later)

    def manages(self, user: str, app: str) -> bool:
        return user in self.managers.get(app, ())

    def token_ids(self, user: str) -> list[str]:
        return sorted(tid for name, tid in self.tokens.values() if name == user)


def revoked_tokens(ledger: Ledger, tokens: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (user, token_id) are revoked, by what the ledger holds now (sequenced
    or not: a revocation whose 204 was sent counts), in one read of their users' streams."""
    users = sorted({user for user, _ in tokens})
    found = ledger.read_streams([f"user-{u}" for u in users], ["TokenRevoked"])
    return {(e.stream.removeprefix("user-"), e.data["token_id"]) for e in found} & tokens


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """(token, token_id, token_hash). The token is shown once and never stored."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, secrets.token_hex(6), hash_token(token)


def user_events(name: str, role: str, host_id: str | None = None,
                label: str = "") -> tuple[str, list[NewEvent]]:
    """The events that create a user with a first token, and that token."""
    token, issued = token_event(name, label)
    return token, [NewEvent("UserCreated", {"name": name, "role": role, "host_id": host_id}),
                   issued]


def token_event(name: str, label: str = "") -> tuple[str, NewEvent]:
    """A new token for user `name` (shown once) and the TokenIssued event that stores only
    its hash: the one place that event is made."""
    token, token_id, digest = new_token()
    return token, NewEvent("TokenIssued", {"user": name, "token_id": token_id,
                                           "token_hash": digest, "label": label})


def bearer(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header, or Unauthorized."""
    if not header:
        raise Unauthorized("no API token: run `tally login` (send Authorization: Bearer)")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be `Bearer <token>`")
    return token.strip()


def require_role(who: Principal, *roles: str) -> None:
    if who.role not in roles:
        raise Forbidden(f"{who.role} tokens may not do this (needs {' or '.join(roles)})")


def require_host(who: Principal, host_id: str, role: str = "agent") -> None:
    """Agents (balancers) act only for their own host; admins for any."""
    if who.is_admin:
        return
    if who.role != role or who.host_id != host_id:
        raise Forbidden(f"this token may not act for host {host_id!r}")


def create_user(ledger: Ledger, name: str, role: str, host_id: str | None = None,
                actor: str = "operator") -> str:
    """Create a user straight on the ledger (the operator's path: `tally admin create-user`,
    `tally up`); returns the token, shown once. VersionConflict if the name is taken,
    ValueError for a host binding the role cannot have."""
    if problem := host_binding_problem(role, host_id):
        raise ValueError(problem)
    token, events = user_events(name, role, host_id, label="created by " + actor)
    stamped = [NewEvent(e.type, e.data, {"actor": actor, "role": "operator"}) for e in events]
    ledger.append(f"user-{name}", stamped, expected_version=NO_STREAM)
    return token


def issue_token(ledger: Ledger, name: str, actor: str = "operator", label: str = "") -> str:
    """Another token for an existing user, straight on the ledger (the operator's path:
    `tally up` reissuing an agent's lost token); returns it, shown once. LedgerError if
    there is no such user (or the stream moved meanwhile: VersionConflict)."""
    stream = f"user-{name}"
    version = ledger.stream_version(stream)
    if version == 0:
        raise LedgerError(f"no user named {name!r}")
    token, issued = token_event(name, label or "issued by " + actor)
    ledger.append(stream, [NewEvent(issued.type, issued.data,
                                    {"actor": actor, "role": "operator"})],
                  expected_version=version)
    return token


def has_admin(ledger: Ledger) -> bool:
    """Whether any admin user exists (so `tally up` knows to make the first one)."""
    directory = Directory()
    ledger.sequence()
    after = 0
    while batch := ledger.read_all(after, categories=["user"], types=["UserCreated"]):
        directory.apply(batch)
        after = batch[-1].position or after
    return any(u.role == "admin" for u in directory.users.values())
