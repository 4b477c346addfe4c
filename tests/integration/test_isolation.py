"""Tenant isolation, first half (names, files, identities, small holes): two tenants, each
attack tried as one member or from inside one app against the other and against the
platform, each asserting that it fails and that the victim is unaffected.

The other half (cgroups, quotas, network reach, ports) is tests/integration/
test_isolation_limits.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from api.testing import project_now
from ledger import NewEvent
from ledger.hostnames import DEFAULT_SUFFIX, PLATFORM_STREAM
from tests.integration.test_api import World, uid, world  # noqa: F401


def routes_of(w: World, app: str) -> dict[str, str]:
    """hostname -> app, of the routes view rows naming this app or its hostnames."""
    project_now(w.owner_dsn)
    with psycopg2.connect(w.owner_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT hostname, app FROM views.routes WHERE app = %s "
                    "OR hostname LIKE %s", (app, f"%{app}%"))
        found = dict(cur.fetchall())
    conn.close()
    return found


def holder(w: World, domain: str) -> str | None:
    from api.decide import claim_holder, domain_stream

    events = w.ledger.read_stream(domain_stream(domain))
    return claim_holder([(e.type, e.data["app"]) for e in events])


@pytest.fixture
def tenants(world: World) -> tuple[str, str]:  # noqa: F811
    """victim: the owner's app, serving (a release, an instance placed); attacker: an app
    of another member ("other"), with a release too."""
    victim = world.new_app(releases=1)
    attacker = f"evil-{uid()}"
    assert world.call("other", "POST", "/apps", {"name": attacker}).status_code == 201
    from api.testing import pack_files
    from tests.integration.test_api import BUNDLE
    r = world.call("other", "POST", f"/apps/{attacker}/releases", data=pack_files(BUNDLE))
    assert r.status_code == 201, r.json
    return victim, attacker


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", [
    "{victim}.tally.local", "{victim}.TALLY.local.", "*.tally.local", "*.local", "tally.local",
    "x.{victim}.tally.local", "*.{victim}.tally.local"])
def test_no_custom_domain_under_or_covering_the_platform_suffix(
        world: World, tenants: tuple[str, str], domain: str) -> None:  # noqa: F811
    victim, attacker = tenants
    r = world.call("other", "POST", f"/apps/{attacker}/domains",
                   {"domain": domain.format(victim=victim)})
    assert r.status_code == 422, r.json
    assert "domain" in r.json["fields"], r.json
    assert world.call("other", "GET", f"/apps/{attacker}/domains").json["domains"] == []
    assert routes_of(world, victim)[f"{victim}.tally.local"] == victim


def test_platform_name_claimed_at_create_released_at_delete(world: World) -> None:  # noqa: F811
    name = f"named-{uid()}"
    assert world.call("owner", "POST", "/apps", {"name": name}).status_code == 201
    assert holder(world, f"{name}.tally.local") == name
    assert world.call("owner", "DELETE", f"/apps/{name}").status_code == 204
    assert holder(world, f"{name}.tally.local") is None


def test_routes_are_owned_by_claim_not_by_the_last_write(
        world: World, tenants: tuple[str, str]) -> None:  # noqa: F811
    """Even if an app's stream names another app's hostname (a history from before the
    claim rule, or any writer that skipped the claim), the route stays with the holder,
    and that app removing the name leaves the holder's route alone."""
    victim, attacker = tenants
    domain = f"{victim}.example.com"  # claimed by the victim in new_app
    world.ledger.append(f"app-{attacker}", [NewEvent("DomainAdded", {
        "app": attacker, "domain": domain})])
    assert routes_of(world, victim)[domain] == victim
    world.ledger.append(f"app-{attacker}", [NewEvent("DomainRemoved", {
        "app": attacker, "domain": domain})])
    assert routes_of(world, victim)[domain] == victim
    world.ledger.append(f"app-{attacker}", [NewEvent("DomainAdded", {
        "app": attacker, "domain": f"{victim}.tally.local"})])
    assert routes_of(world, victim)[f"{victim}.tally.local"] == victim


def test_removing_a_domain_never_touches_another_apps_route(
        world: World, tenants: tuple[str, str]) -> None:  # noqa: F811
    victim, attacker = tenants
    domain = f"{victim}.example.com"
    r = world.call("other", "DELETE", f"/apps/{attacker}/domains/{domain}")
    assert r.status_code == 404
    assert holder(world, domain) == victim
    assert routes_of(world, victim)[domain] == victim


@pytest.fixture
def suffix(world: World) -> Iterator[Any]:  # noqa: F811
    """Set the platform suffix for one test, and back to the default after it."""
    def set_suffix(value: str) -> None:
        world.ledger.append(PLATFORM_STREAM, [NewEvent("PlatformSuffixSet", {"suffix": value})])
    yield set_suffix
    set_suffix(DEFAULT_SUFFIX)
    project_now(world.owner_dsn)


def test_the_suffix_is_a_ledger_fact_the_api_and_routes_follow(
        world: World, tenants: tuple[str, str], suffix: Any) -> None:  # noqa: F811
    victim, attacker = tenants
    suffix("localhost")
    routes = routes_of(world, victim)
    assert routes.get(f"{victim}.localhost") == victim
    assert f"{victim}.tally.local" not in routes
    for domain in (f"{victim}.localhost", "*.localhost"):
        r = world.call("other", "POST", f"/apps/{attacker}/domains", {"domain": domain})
        assert r.status_code == 422 and "domain" in r.json["fields"], r.json
    r = world.call("other", "POST", f"/apps/{attacker}/domains",
                   {"domain": f"{victim}.tally.local"})
    assert r.status_code == 409, "the victim's former platform name stays its own"
    fresh = f"fresh-{uid()}"
    assert world.call("owner", "POST", "/apps", {"name": fresh}).status_code == 201
    assert holder(world, f"{fresh}.localhost") == fresh


def test_operators_read_and_set_the_suffix_from_the_cli(world: World, cluster: Any,  # noqa: F811
                                                        suffix: Any) -> None:
    import subprocess
    import sys

    from tests.conftest import tally_env

    def admin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", "admin", "suffix", *args],
                              env=tally_env(cluster), capture_output=True, text=True)
    assert admin().stdout.strip() == DEFAULT_SUFFIX
    bad = admin("not a name")
    assert bad.returncode == 1 and "DNS name" in bad.stderr
    assert admin("Apps.Example.").stdout.strip() == "apps.example"
    assert admin().stdout.strip() == "apps.example"


# --- small holes ---------------------------------------------------------------------------


def test_host_re_registration_keeps_what_it_does_not_name(world: World) -> None:  # noqa: F811
    host = f"h-{uid()}"
    from api.auth import create_user
    token = create_user(world.ledger, f"agent-{uid()}", "agent", host)
    auth = {"Authorization": f"Bearer {token}"}
    first = {"address": "10.0.0.5", "port_min": 20000, "port_max": 20099, "capacity": 4}
    r = world.client.put(f"/hosts/{host}", json={"address": "10.0.0.5"}, headers=auth)
    assert r.status_code == 422 and set(r.json["fields"]) == {"port_min", "port_max",
                                                              "capacity"}
    r = world.client.put(f"/hosts/{host}", json={**first, "run_endpoint": "tcp://10.0.0.5:1",
                                                 "memory_mb": 2048}, headers=auth)
    assert r.status_code == 200, r.json
    r = world.client.put(f"/hosts/{host}", json={"capacity": 8}, headers=auth)
    assert r.status_code == 200, r.json
    last = world.ledger.read_stream(f"host-{host}")[-1].data
    assert last == {**first, "host_id": host, "capacity": 8, "memory_mb": 2048,
                    "run_endpoint": "tcp://10.0.0.5:1"}


def _poison(value: Any, bad: str, depth: int = 0) -> tuple[Any, int]:
    """value with `bad` appended to every string in it (and to keys below the top level:
    process types, config var names), and how many."""
    if isinstance(value, str):
        return value + bad, 1
    if isinstance(value, dict):
        out, n = {}, 0
        for k, v in value.items():
            pv, m = _poison(v, bad, depth + 1)
            out[k + bad if depth else k] = pv
            n += m + (1 if depth else 0)
        return out, n
    if isinstance(value, list):
        parts = [_poison(v, bad, depth + 1) for v in value]
        return [p for p, _ in parts], sum(m for _, m in parts)
    return value, 0


def _string_rows() -> list[tuple[str, str, Any]]:
    """The permission matrix's rows whose bodies hold a string (a callable's all do)."""
    from tests.integration.test_api_permissions import MATRIX
    return [(m, p, b) for m, p, b, _ in MATRIX
            if callable(b) or isinstance(b, dict) and _poison(b, "x")[1]]


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "surrogate"])
@pytest.mark.parametrize("method, path, body", _string_rows(),
                         ids=[f"{m} {p}" for m, p, _ in _string_rows()])
def test_nul_and_lone_surrogates_are_422_naming_the_field(
        world: World, bad: str, method: str, path: str, body: Any) -> None:  # noqa: F811
    from tests.integration.test_api_permissions import _fill
    app = world.new_app(releases=1)
    poisoned, _ = _poison(body(world) if callable(body) else body, bad)
    head = world.ledger.sequence()
    r = world.call("admin", method, _fill(path, world, app), poisoned)
    assert r.status_code == 422, r.get_json()
    assert r.json["fields"] and "NUL" in r.json["message"]
    assert world.ledger.sequence() == head or not any(
        bad in str(e.data) for e in world.ledger.read_all(head, limit=1000))


def test_a_bad_description_stores_no_bundle(world: World) -> None:  # noqa: F811
    from api.testing import pack_files
    from tests.integration.test_api import BUNDLE
    app = world.new_app(releases=0)
    stored = set(world.client.application.extensions["tally"].settings.bundles_dir.iterdir())
    for bad in ("%00", "x%00y"):
        r = world.call("owner", "POST", f"/apps/{app}/releases?description={bad}",
                       data=pack_files({**BUNDLE, "app.py": f"# {uid()}\n"}))
        assert r.status_code == 422 and "description" in r.json["fields"], r.json
    settings = world.client.application.extensions["tally"].settings
    assert set(settings.bundles_dir.iterdir()) == stored
    r = world.call("owner", "GET", f"/apps/{app}/events?stream=%00")
    assert r.status_code in (404, 422), r.json


def test_a_revoked_token_fails_on_every_worker_before_the_204(
        world: World, cluster: Any, tmp_path: Any) -> None:  # noqa: F811
    """Two API processes' worth of state (two apps, each with its own directory, refreshed
    only every minute): the one that did not revoke refuses the token right after."""
    from api import Settings, create_app

    workers = [create_app(Settings(cluster.dsn(), tmp_path, auth_refresh_s=60.0)).test_client()
               for _ in range(2)]
    user = world.names["other"]
    r = world.call("other", "POST", f"/users/{user}/tokens", {"label": "stolen laptop"})
    token, token_id = r.json["token"], r.json["token_id"]
    auth = {"Authorization": f"Bearer {token}"}
    for w in workers:
        assert w.get("/me", headers=auth).status_code == 200  # both directories now warm
    assert workers[0].delete(f"/users/{user}/tokens/{token_id}",
                             headers=auth).status_code == 204
    for w in workers:
        assert w.get("/me", headers=auth).status_code == 401
        assert w.get(f"/apps/{world.new_app(releases=0)}", headers=auth).status_code == 401
    kept = {"Authorization": f"Bearer {world.tokens['other']}"}
    assert workers[1].get("/me", headers=kept).status_code == 200, "other tokens still work"


def test_tally_down_stops_the_apps_cluster_too() -> None:
    """An add-on started the apps' cluster; `tally down` leaves nothing running."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from ledger.cluster import Cluster, ClusterSpec
    from tests.conftest import free_ports

    tmp_path = Path(tempfile.mkdtemp(prefix="tally-test-"))
    tmp_path.chmod(0o755)
    ports = free_ports(4)
    apps = Cluster(ClusterSpec(tmp_path / "appsdb", ports=(ports[0], ports[1]),
                               dbname="tally_apps"))
    apps.init()
    try:
        assert [n.running for n in apps.status()] == [True, True]
        env = {**os.environ, "TALLY_HOME": str(tmp_path),
               "TALLY_APPS_DB_PORTS": f"{ports[0]},{ports[1]}",
               "TALLY_LEDGER_PORTS": f"{ports[2]},{ports[3]}"}
        down = subprocess.run([sys.executable, "-m", "tally.cli", "down"], env=env,
                              capture_output=True, text=True)
        assert down.returncode == 0, down.stderr
        assert [n.running for n in apps.status()] == [False, False]
    finally:
        apps.destroy()
        shutil.rmtree(tmp_path, ignore_errors=True)
