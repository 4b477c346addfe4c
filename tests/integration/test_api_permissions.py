"""The permission matrix: every endpoint, asked by an admin, the app's owner, another
member, an agent, a builder, and nobody. One table; each row says who gets in and what they get."""

from __future__ import annotations

import re
from typing import Any

import pytest

from api.web import ROUTES
from ledger import NewEvent
from tests.api_process import pack_files
from tests.integration.test_api import BUNDLE, World, uid, world  # noqa: F401

CALLERS = ("admin", "owner", "other", "agent", "builder", "balancer", None)
PEOPLE = {"admin", "owner"}
ANYONE = {"admin", "owner", "other", "agent", "builder", "balancer"}

# (method, path, body, {caller: status when allowed}) - every other caller: 403, nobody: 401.
MATRIX: list[tuple[str, str, Any, dict[str, int]]] = [
    ("GET", "/me", None, dict.fromkeys(ANYONE, 200)),
    ("GET", "/users", None, {"admin": 200}),
    ("POST", "/users", lambda w: {"name": f"u-{uid()}"}, {"admin": 201}),
    ("POST", "/users/{owner_name}/tokens", {}, {"admin": 201, "owner": 201}),
    ("DELETE", "/users/{owner_name}/tokens/nope", None, {"admin": 404, "owner": 404}),
    ("GET", "/apps", None, {"admin": 200, "owner": 200, "other": 200}),
    ("POST", "/apps", lambda w: {"name": f"n-{uid()}"},
     {"admin": 201, "owner": 201, "other": 201}),
    ("GET", "/apps/{app}", None, dict.fromkeys(PEOPLE, 200)),
    ("DELETE", "/apps/{app}", None, dict.fromkeys(PEOPLE, 204)),
    ("POST", "/apps/{app}/members", lambda w: {"user": w.names["other"]},
     dict.fromkeys(PEOPLE, 200)),
    ("DELETE", "/apps/{app}/members/{other_name}", None, dict.fromkeys(PEOPLE, 404)),
    ("POST", "/apps/{app}/releases", "bundle", dict.fromkeys(PEOPLE, 201)),
    ("GET", "/apps/{app}/releases", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/releases/1", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/releases/1/bundle", None, {"admin": 200, "owner": 200, "agent": 200}),
    # No builder in this world: the build is pending, so there is no slug yet (404).
    ("GET", "/apps/{app}/releases/1/slug", None, {"admin": 404, "owner": 404, "agent": 404}),
    ("GET", "/apps/{app}/releases/1/build", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/builds", None, dict.fromkeys(PEOPLE, 200)),
    ("POST", "/apps/{app}/rollback", {"release": 1}, dict.fromkeys(PEOPLE, 201)),
    ("POST", "/apps/{app}/scale", {"scale": {"web": 2}}, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/config", None, dict.fromkeys(PEOPLE, 200)),
    ("PATCH", "/apps/{app}/config", {"set": {"K": "v"}}, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/domains", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/certs", None, dict.fromkeys(PEOPLE, 200)),
    ("POST", "/apps/{app}/certs", {}, dict.fromkeys(PEOPLE, 422)),
    ("DELETE", "/apps/{app}/certs/nope", None, dict.fromkeys(PEOPLE, 404)),
    ("POST", "/apps/{app}/domains", lambda w: {"domain": f"d{uid()}.example.org"},
     dict.fromkeys(PEOPLE, 201)),
    ("DELETE", "/apps/{app}/domains/{app}.example.com", None, dict.fromkeys(PEOPLE, 200)),
    ("PUT", "/apps/{app}/maintenance", {"enabled": True}, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/ps", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/placements", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/routes", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/events", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/why", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/state?at=1", None, {"admin": 200}),
    ("GET", "/diff?a=1&b=2", None, {"admin": 200}),
    ("GET", "/apps/{app}/logs", None, dict.fromkeys(PEOPLE, 200)),
    ("GET", "/apps/{app}/stats", None, dict.fromkeys(PEOPLE, 200)),
    # No host agent in this world: a run passes every check, then finds no host (409).
    ("POST", "/apps/{app}/runs", {"command": ["id"]}, dict.fromkeys(PEOPLE, 409)),
    ("GET", "/apps/{app}/runs/{run}", None, dict.fromkeys(PEOPLE, 200)),
    # Only who started a run attaches (the owner, here), and only over a WebSocket (400).
    ("GET", "/apps/{app}/runs/{run}/attach", None, {"owner": 400}),
    ("POST", "/apps/{app}/runs/{run}/stop", None, dict.fromkeys(PEOPLE, 409)),
    ("GET", "/apps/{app}/addons", None, dict.fromkeys(PEOPLE, 200)),
    # No apps cluster in this world: an add-on passes every check, then 409.
    ("POST", "/apps/{app}/addons", {"kind": "postgresql"}, dict.fromkeys(PEOPLE, 409)),
    ("DELETE", "/apps/{app}/addons/postgresql-{app}", None, dict.fromkeys(PEOPLE, 404)),
    ("POST", "/apps/{app}/attachments", {"addon": "postgresql-nosuch"},
     dict.fromkeys(PEOPLE, 404)),
    ("DELETE", "/apps/{app}/attachments/postgresql-nosuch", None, dict.fromkeys(PEOPLE, 404)),
    ("GET", "/apps/{app}/backups", None, dict.fromkeys(PEOPLE, 200)),
    # No database in this world's apps: a capture passes every check, then 409.
    ("POST", "/apps/{app}/backups", None, dict.fromkeys(PEOPLE, 409)),
    ("POST", "/apps/{app}/backups/nope/restore", {"confirm": "x"}, dict.fromkeys(PEOPLE, 422)),
    ("GET", "/apps/{app}/backups/nope/download", None, dict.fromkeys(PEOPLE, 404)),
    ("GET", "/quotas/users/{owner_name}", None, {"admin": 200, "owner": 200}),
    ("PUT", "/quotas/users/{owner_name}", {"instances": 100}, {"admin": 200}),
    ("GET", "/quotas/apps/{app}", None, dict.fromkeys(PEOPLE, 200)),
    ("PUT", "/quotas/apps/{app}", {"instances": 50}, {"admin": 200}),
    ("GET", "/hosts", None, {"admin": 200}),
    ("PUT", "/hosts/{host}", {"address": "10.0.0.9", "port_min": 20000, "port_max": 20999,
                              "capacity": 8}, {"admin": 200, "agent": 200}),
    ("POST", "/hosts/{host}/heartbeats", {"load": 0.5}, {"admin": 202, "agent": 202}),
    ("GET", "/hosts/{host}/placements", None, {"admin": 200, "agent": 200}),
    ("GET", "/hosts/{host}/desired", None, {"admin": 200, "agent": 200}),
    ("POST", "/hosts/{host}/stats", {"samples": []}, {"admin": 200, "agent": 200}),
    ("POST", "/apps/{app}/runs/1/ended", {"run_id": "r1"}, {"agent": 404}),
    ("POST", "/instances/{instance}/events",
     lambda w: {"type": "InstanceHealthy", "data": {"host_id": w.host}},
     {"admin": 200, "agent": 200}),
    # Builder tokens only; the app's releases are unbuilt: v2 is claimed, nobody holds v1's
    # claim (409 for the builder on each route of a claim holder).
    ("GET", "/builds/queue", None, {"builder": 200}),
    ("POST", "/apps/{app}/releases/2/build/claim", {"lease_s": 30}, {"builder": 200}),
    ("POST", "/apps/{app}/releases/1/build/renew", {"attempt": 1}, {"builder": 409}),
    ("GET", "/apps/{app}/releases/1/build/bundle?attempt=1", None, {"builder": 409}),
    ("POST", "/apps/{app}/releases/1/build/output", {"attempt": 1, "text": "x"},
     {"builder": 409}),
    ("POST", "/apps/{app}/releases/1/build/failed", {"attempt": 1, "reason": "x"},
     {"builder": 409}),
    ("PUT", "/apps/{app}/releases/1/build/slug?attempt=1", "bundle", {"builder": 409}),
    # Balancer tokens (bound to their own balancer id) and admins.
    ("GET", "/balancers/{balancer}/routing", None, {"admin": 200, "balancer": 200}),
    ("POST", "/balancers/{balancer}/stats", {"samples": []},
     {"admin": 200, "balancer": 200}),
    ("GET", "/placements", None, {"admin": 200}),
    ("GET", "/instances", None, {"admin": 200}),
    ("GET", "/routes", None, {"admin": 200}),
    ("GET", "/backups", None, {"admin": 200}),
    ("GET", "/events", None, {"admin": 200}),
]


@pytest.fixture(scope="module", autouse=True)
def room(world: World) -> None:  # noqa: F811
    """The owner makes an app per row and caller (over 100 of them): room for all their
    instances, so the instances quota answers no row."""
    w = world
    w.ledger.append(f"quota-user:{w.names['owner']}", [NewEvent("QuotaSet", {
        "subject": "user", "name": w.names["owner"], "instances": 100_000,
        "memory_mb": 100_000_000})])


def _fill(path: str, w: World, app: str) -> str:
    if "{instance}" in path:  # the instance new_app placed on the agent's host
        placed = w.ledger.read_stream(f"placement-{app}")[0]
        path = path.replace("{instance}", placed.data["instance_id"])
    if "{run}" in path:  # a run the owner started (standing in for POST .../runs)
        w.ledger.append(f"app-{app}", [NewEvent("RunStarted", {
            "app": app, "number": 1, "run_id": uid(), "command": ["id"],
            "host_id": w.host, "release": 1}, {"actor": w.names["owner"]})])
        path = path.replace("{run}", "1")
    return (path.replace("{app}", app).replace("{host}", w.host)
            .replace("{balancer}", f"lb-{w.host}")
            .replace("{owner_name}", w.names["owner"]).replace("{other_name}", w.names["other"]))


def test_matrix_covers_every_route() -> None:
    """A new endpoint without a row here fails this test."""
    rows = [(m, re.sub(r"\{[a-z_]+\}", "x", p).split("?")[0]) for m, p, _, _ in MATRIX]
    for r in ROUTES:
        pattern = re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "[^/]+", r.rule)
        assert any(m == r.method and re.fullmatch(pattern, p) for m, p in rows), \
            f"{r.method} {r.rule} has no row in MATRIX"


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c or "nobody")
@pytest.mark.parametrize("method, path, body, allowed", MATRIX,
                         ids=[f"{m} {p}" for m, p, _, _ in MATRIX])
def test_permission(world: World, caller: str | None, method: str, path: str, body: Any,  # noqa: F811
                    allowed: dict[str, int]) -> None:
    app = world.new_app(releases=2)
    url = _fill(path, world, app)
    if body == "bundle":
        r = world.call(caller, method, url, data=pack_files(BUNDLE))
    else:
        r = world.call(caller, method, url, body(world) if callable(body) else body)
    expected = 401 if caller is None else allowed.get(caller, 403)
    assert r.status_code == expected, (caller, r.status_code, r.get_json())
    r.close()
    if r.status_code >= 400:
        assert set(r.get_json()) >= {"error", "message", "fields"}
