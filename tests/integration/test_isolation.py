"""Tenant isolation, first half (names, files, identities, small holes): two tenants, each
attack tried as one member or from inside one app against the other and against the
platform, each asserting that it fails and that the victim is unaffected.

The other half (cgroups, quotas, network reach, ports) is tests/integration/
test_isolation_limits.py.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import pytest
from psycopg2 import sql

from ledger import Ledger, NewEvent
from ledger.cluster import Cluster, ClusterSpec
from ledger.hostnames import DEFAULT_SUFFIX, PLATFORM_STREAM
from tests.api_process import project_now
from tests.conftest import app_user
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
    from tests.api_process import pack_files
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
    from tests.conftest import tally_env

    def admin(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tally.cli", "admin", "suffix", *args],
                              env=tally_env(cluster), capture_output=True, text=True)
    assert admin().stdout.strip() == DEFAULT_SUFFIX
    bad = admin("not a name")
    assert bad.returncode == 1 and "DNS name" in bad.stderr
    assert admin("Apps.Example.").stdout.strip() == "apps.example"
    assert admin().stdout.strip() == "apps.example"
    from tally.config import Config
    from tally.platform import UP_SUFFIX, platform_suffix
    cfg = Config.from_env(tally_env(cluster))
    assert platform_suffix(cfg, UP_SUFFIX, if_unset=True) == "apps.example", \
        "tally up keeps an operator's choice"
    assert platform_suffix(cfg, UP_SUFFIX) == UP_SUFFIX == "localhost"


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
    assert last.items() >= {**first, "host_id": host, "capacity": 8, "memory_mb": 2048,
                            "run_endpoint": "tcp://10.0.0.5:1"}.items()


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


def _string_rows() -> list[tuple[str, str, Any, str]]:
    """The permission matrix's rows whose bodies hold a string (a callable's all do), with
    a caller the row lets in (admin if it may)."""
    from tests.integration.test_api_permissions import MATRIX
    return [(m, p, b, "admin" if "admin" in allowed else next(iter(allowed)))
            for m, p, b, allowed in MATRIX
            if allowed and (callable(b) or isinstance(b, dict) and _poison(b, "x")[1])]


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "surrogate"])
@pytest.mark.parametrize("method, path, body, caller", _string_rows(),
                         ids=[f"{m} {p}" for m, p, _, _ in _string_rows()])
def test_nul_and_lone_surrogates_are_422_naming_the_field(
        world: World, bad: str, method: str, path: str, body: Any,  # noqa: F811
        caller: str) -> None:
    from tests.integration.test_api_permissions import _fill
    app = world.new_app(releases=1)
    poisoned, _ = _poison(body(world) if callable(body) else body, bad)
    head = world.ledger.sequence()
    r = world.call(caller, method, _fill(path, world, app), poisoned)
    assert r.status_code == 422, r.get_json()
    assert r.json["fields"] and "NUL" in r.json["message"]
    assert world.ledger.sequence() == head or not any(
        bad in str(e.data) for e in world.ledger.read_all(head, limit=1000))


def test_a_bad_description_stores_no_bundle(world: World) -> None:  # noqa: F811
    from tests.api_process import pack_files
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


class WatchedCluster(Cluster):
    """A real cluster that notes, while initdb runs, the mode of its password file, the
    mode of that file's folder and the folder's owner."""

    def __init__(self, spec: ClusterSpec) -> None:
        super().__init__(spec)
        self.seen: list[tuple[int, int, int]] = []

    def _run(self, *args: str | Path, env: dict[str, str] | None = None) -> str:
        for a in map(str, args):
            if a.startswith("--pwfile="):
                f = Path(a.split("=", 1)[1])
                self.seen.append((stat.S_IMODE(f.stat().st_mode),
                                  stat.S_IMODE(f.parent.stat().st_mode), f.parent.stat().st_uid))
        return super()._run(*args, env=env)


@pytest.fixture(scope="module")
def apps_db() -> Iterator[WatchedCluster]:
    """An apps' database cluster as the first add-on makes it, in a home of its own."""
    from tests.conftest import free_ports

    home = Path(tempfile.mkdtemp(prefix="tally-test-"))
    home.chmod(0o755)
    low, high = free_ports(2)
    from agents.appsdb import PRIVATE_LOGS

    apps = WatchedCluster(ClusterSpec(home / "appsdb", ports=(low, high), dbname="tally_apps",
                                      extra_settings=dict(PRIVATE_LOGS)))
    apps.init()
    yield apps
    apps.destroy()
    shutil.rmtree(home, ignore_errors=True)


def test_the_apps_cluster_password_is_private_from_its_first_byte(
        apps_db: WatchedCluster) -> None:
    """The apps' cluster is made while apps already run (at the first add-on)."""
    assert [mode[:2] for mode in apps_db.seen] == [(0o600, 0o700)]
    assert apps_db.seen[0][2] == pwd.getpwnam("postgres").pw_uid
    assert not list(apps_db.root.glob(".pw*")) and not (apps_db.root / "run" / ".pw").exists()


def test_an_addon_role_sees_only_its_own_database(apps_db: WatchedCluster) -> None:
    from agents import addons

    apps_db.start()
    mine, theirs = f"mine-{uid()}", f"theirs-{uid()}"
    url, other_url = (addons.create_database(apps_db, a) for a in (mine, theirs))
    other_db = addons.database_name(theirs)
    for db in (other_db, "postgres", "template1", "tally_apps"):
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            psycopg2.connect(url.rsplit("/", 1)[0] + f"/{db}")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE notes (body text)")
            for query in ("SELECT datname FROM pg_database", "SELECT rolname FROM pg_roles",
                          "SELECT usename FROM pg_user", "SELECT datname FROM pg_stat_activity",
                          "SELECT * FROM pg_stat_get_activity(NULL)",
                          "SELECT datname FROM pg_stat_database"):
                with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                    cur.execute(query)
            cur.execute("SELECT relname FROM pg_class WHERE relname = 'notes'")
            assert cur.fetchall() == [("notes",)], "its own catalogs stay readable"
    finally:
        conn.close()
    psycopg2.connect(other_url).close()


def test_an_addon_database_past_its_quota_is_read_only_then_refused(
        apps_db: WatchedCluster) -> None:
    """The review's database fill, from the app's own credentials: it inserts past its
    database_mb quota; the watcher's next round makes its database read-only (its session
    ended, its next INSERT refused as read-only, its reads fine). It then turns read-only
    off for its session, opens its database to PUBLIC and writes on past 1.25 times the
    limit: the next round refuses its connections. Its neighbour writes all along; an admin
    raising its quota lets it write again. A session's temporary files are bounded."""
    from agents import addons, dbsize

    apps_db.start()
    app, neighbour = f"fill-{uid()}", f"calm-{uid()}"
    url, other_url = (addons.create_database(apps_db, a) for a in (app, neighbour))
    conn = addons.superuser(apps_db)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_database_size(%s)", (addons.database_name(app),))
        empty_mb = cur.fetchone()[0] // 2**20
    conn.close()
    limits = {app: empty_mb + 4, neighbour: empty_mb + 4}
    told: list[tuple[str, str]] = []
    watcher = dbsize.Watcher(lambda: addons.superuser(apps_db),  # others' (this module's): big
                             lambda a: limits.get(a, 10**6), lambda a, line: told.append((a, line)))

    def session(which: str, setup: str = "") -> Any:
        c = psycopg2.connect(which)
        c.autocommit = True
        if setup:
            with c.cursor() as cur:
                cur.execute(setup)
        return c

    def insert(c: Any, mb: int) -> None:  # rows of 960 bytes: stored as they are
        with c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS fill (body text)")
            cur.execute("INSERT INTO fill SELECT repeat(md5(i::text), 30) "
                        "FROM generate_series(1, %s) i", (mb * 1024,))

    filler, calm = session(url), session(other_url)
    insert(filler, 6)
    assert [(c.database, c.after) for c in watcher.tick()] == [
        (addons.database_name(app), dbsize.READ_ONLY)]
    with pytest.raises(psycopg2.Error):
        insert(filler, 1)  # its session was ended
    again = session(url)
    with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction, match="read-only"):
        insert(again, 1)
    with again.cursor() as cur:
        cur.execute("SELECT count(*) FROM fill")
        assert cur.fetchone()[0] == 6 * 1024
        cur.execute("SHOW temp_file_limit")
        assert cur.fetchone()[0] == dbsize.TEMP_FILE_LIMIT
    insert(calm, 1)
    writer = session(url, "SET default_transaction_read_only = off")
    with writer.cursor() as cur:
        cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(
            sql.Identifier(addons.database_name(app))))
    insert(writer, 4)
    assert [c.after for c in watcher.tick()] == [dbsize.REFUSED]
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        session(url)
    insert(calm, 1)
    assert watcher.tick() == [], "a refused database stays refused"
    limits[app] = empty_mb + 100
    assert [c.after for c in watcher.tick()] == [dbsize.OK]
    insert(session(url), 1)
    for c in (filler, calm, again, writer):
        c.close()
    assert [(a, line.split(":")[0]) for a, line in told] == [
        (app, "Error D18 (Database size quota exceeded)")] * 2 + [(app, f"app_{app}".replace(
            "-", "_") + " is writable again")], told


def test_a_refused_database_lets_no_role_in(apps_db: WatchedCluster) -> None:
    """Review 4: the owner let its tenant's other app's role into its database before it
    went past 1.25 times its quota; refusing it ends that role's sessions and connections
    too (they wrote on before), and a grant made later is taken back at the next round."""
    from agents import addons, dbsize

    apps_db.start()
    a, b = f"qa-{uid()}", f"qb-{uid()}"
    url_a, url_b = (addons.create_database(apps_db, x) for x in (a, b))
    db_a, db_b = addons.database_name(a), addons.database_name(b)
    limits = {a: 1, b: 10**6}
    watcher = dbsize.Watcher(lambda: addons.superuser(apps_db), lambda x: limits.get(x, 10**6))
    owner = psycopg2.connect(url_a)
    owner.autocommit = True
    with owner.cursor() as cur:
        cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(db_a), sql.Identifier(db_b)))
    owner.close()
    b_in_a = url_b.rsplit("/", 1)[0] + "/" + db_a
    intruder = psycopg2.connect(b_in_a)
    intruder.autocommit = True
    assert [(c.database, c.after) for c in watcher.tick()] == [(db_a, dbsize.REFUSED)]
    with pytest.raises(psycopg2.Error), intruder.cursor() as cur:
        cur.execute("SELECT 1")  # its session was ended
    for url in (url_a, b_in_a):
        with pytest.raises(psycopg2.OperationalError, match="permission denied"):
            psycopg2.connect(url)
    su = addons.superuser(apps_db)
    with su.cursor() as cur:  # as if a grant slipped in: the next round takes it back
        cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(db_a), sql.Identifier(db_b)))
    su.close()
    assert [c.after for c in watcher.tick()] == [dbsize.REFUSED]
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(b_in_a)


def test_what_a_tenant_makes_the_server_say_is_not_logged(apps_db: WatchedCluster) -> None:
    """Review 4: `RAISE WARNING` of any size (or an error quoting its data) went into the
    apps' cluster's log, on the platform's disk, without bound, read-only database or not."""
    from agents import addons

    apps_db.start()
    url = addons.create_database(apps_db, f"ql-{uid()}")

    def logged() -> int:
        return sum(p.stat().st_size for p in apps_db.root.rglob("*.log"))

    before = logged()
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DO $$ BEGIN FOR i IN 1..20 LOOP "
                    "RAISE WARNING '%', repeat('x', 1000000); END LOOP; END $$")
        with pytest.raises(psycopg2.Error):
            cur.execute("SELECT repeat('y', 5000000)::int")
    conn.close()
    assert logged() - before < 2**16, "20 MB of warnings reached the server's log"


def test_a_read_only_database_does_not_block_the_next_addon(apps_db: WatchedCluster) -> None:
    """Review 4: an app made its own database read-only by default (as the size watcher
    does past a quota); every other app's new add-on then failed (REVOKEs in each app
    database, in a read-only transaction) and its retries met "already has a database"."""
    from agents import addons

    apps_db.start()
    evil = f"qe-{uid()}"
    conn = psycopg2.connect(addons.create_database(apps_db, evil))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                    .format(sql.Identifier(addons.database_name(evil))))
    conn.close()
    psycopg2.connect(addons.create_database(apps_db, f"qv-{uid()}")).close()


def test_a_node_made_before_private_logs_gets_them_at_its_next_start(
        apps_db: WatchedCluster) -> None:
    apps_db.start()
    apps_db.stop_node("b")
    conf = apps_db.node_dir("b") / "postgresql.conf"
    old = [line for line in conf.read_text().splitlines()
           if not line.startswith(("log_file_mode", "log_min_error_statement",
                                   "log_error_verbosity"))]
    conf.write_text("\n".join(old) + "\n")
    (apps_db.root / "b.log").chmod(0o644)
    apps_db.start_node("b")
    assert "log_min_error_statement = panic" in conf.read_text()
    assert stat.S_IMODE((apps_db.root / "b.log").stat().st_mode) == 0o600
    with psycopg2.connect(apps_db.node_dsn("b", dbname="postgres")) as conn, \
            conn.cursor() as cur:
        cur.execute("SHOW log_min_error_statement")
        assert cur.fetchone() == ("panic",)
    conn.close()


def test_tally_down_stops_the_apps_cluster_too(apps_db: WatchedCluster) -> None:
    """An add-on started the apps' cluster; `tally down` leaves nothing running."""
    from tests.conftest import free_ports

    apps_db.start()
    assert [n.running for n in apps_db.status()] == [True, True]
    env = {**os.environ, "TALLY_HOME": str(apps_db.root.parent),
           "TALLY_APPS_DB_PORTS": ",".join(map(str, apps_db.spec.ports)),
           "TALLY_LEDGER_PORTS": ",".join(map(str, free_ports(2)))}
    down = subprocess.run([sys.executable, "-m", "tally.cli", "down"], env=env,
                          capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert [n.running for n in apps_db.status()] == [False, False]


# --- files: from inside one tenant's app, on a real agent ----------------------------------


class Fleet:
    """A private ledger, its home closed as `tally up` closes it, a log collector and one
    host agent running two tenants' real apps (the probe: a hostile app answering HTTP
    with what its own uid can read, list or write on the host)."""

    HOST = "hi"

    def __init__(self) -> None:
        from tally.config import Config
        from tally.platform import close_home
        from tests.conftest import free_port_range, free_ports, make_cluster
        from tests.fixtures.apps.fleet import AgentProc, Daemon

        self.cluster = make_cluster()
        self.home = self.cluster.root.parent
        close_home(Config.from_env({"TALLY_HOME": str(self.home)}))
        self.endpoint = endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        low, _ = free_port_range(10)
        self.collector = Daemon(self.cluster, "collector", ["collector"],
                                TALLY_COLLECTOR=endpoint)
        self.agent = AgentProc(self.cluster, self.HOST, (low, low + 9), collector=endpoint)
        self.ports = iter(range(low, low + 10))
        self.range = (low, low + 9)
        first, last = (int(x) for x in os.environ["TALLY_APP_UIDS"].split("-"))
        self.uids = iter(range(last, first, -1))  # the API's allocations count up from first
        self.collector.start()
        self.agent.start()

    def deploy(self, app: str, web: str | None = None,
               port: int | None = None) -> tuple[int, int, str]:
        """Create the app (with a uid of its own, as the API gives), release the probe
        (with `web` as its web command if given), place one web instance (on `port` if
        given); return its port, uid and instance id once healthy."""
        from ledger import Ledger
        from tests.fixtures.apps import app_tarball, procfile, store
        from tests.fixtures.apps.fleet import built
        from tests.waiting import wait_until

        digest = store(app_tarball("probe"), self.home / "bundles")
        port, app_uid = port or next(self.ports), next(self.uids)
        iid = f"{app}.1.web.{uid()}"
        procfile_ = procfile("probe") | ({"web": web} if web else {})
        with Ledger(self.cluster.dsn()) as ledger:
            result = ledger.append(f"app-{app}", [
                NewEvent("AppCreated", {"name": app, "owner": "ann", "uid": app_uid}),
                NewEvent("ReleaseCreated", {"app": app, "release": 1, "bundle_digest": digest,
                                            "procfile": procfile_,
                                            "config_version": 0})])
            built(ledger, self.home, app, 1, result.versions[-1], app_tarball("probe"))
            ledger.append(f"placement-{app}", [NewEvent("InstancePlaced", {
                "instance_id": iid, "app": app, "release": 1, "process_type": "web",
                "host_id": self.HOST, "port": port})])

            def healthy() -> bool:
                ledger.sequence()
                return any(e.type == "InstanceHealthy"
                           for e in ledger.read_stream(f"instance-{iid}"))
            wait_until(healthy, 240, f"{app}'s probe healthy")
        return port, app_uid, iid

    def delete(self, app: str, iid: str) -> None:
        from ledger import Ledger

        with Ledger(self.cluster.dsn()) as ledger:
            ledger.append(f"placement-{app}", [NewEvent("InstanceUnplaced", {
                "instance_id": iid, "app": app, "reason": "deleted"})])
            ledger.append(f"app-{app}", [NewEvent("AppDeleted", {"name": app})])

    def stop(self) -> None:
        from tests.conftest import destroy_cluster

        self.agent.kill()
        self.agent.kill_apps()
        self.collector.kill()
        destroy_cluster(self.cluster)


def probe(port: int, what: str, path: str, data: str | None = None,
          timeout: float = 10) -> dict[str, Any]:
    """Ask the app on `port` to read, list or write `path` as its own uid."""
    import json
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{port}/{what}?path={urllib.parse.quote(str(path))}"
    req = urllib.request.Request(url, data=data.encode() if data is not None else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("needs root: apps run under their own uids only when the agent is root")
    f = Fleet()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def two_apps(fleet: Fleet) -> dict[str, Any]:
    """victim and attacker, each a probe app on the same host: role -> port,
    role_name -> app name, role_iid -> its instance id."""
    names = {"victim": f"vic-{uid()}", "attacker": f"att-{uid()}"}
    out: dict[str, Any] = {}
    for role, name in names.items():
        out[role], _, out[f"{role}_iid"] = fleet.deploy(name)
        out[f"{role}_name"] = name
    return out


def test_an_app_reads_none_of_the_platforms_files(fleet: Fleet,
                                                  two_apps: dict[str, Any]) -> None:
    from tests.waiting import wait_until

    port, victim = two_apps["attacker"], two_apps["victim_name"]
    home = fleet.home
    wait_until(lambda: (home / "applogs" / victim / "current.log").exists(), 30,
               "the victim's logs at the collector")
    ledger = fleet.cluster.root
    closed_reads = [ledger / "a.log", ledger / "b.log", ledger / "credentials.json",
                    home / "applogs" / victim / "current.log",
                    *(home / "bundles").glob("*.tar.gz")]
    for path in closed_reads:
        assert path.exists(), path
        got = probe(port, "read", path)
        assert not got["ok"] and got["error"] == "PermissionError", (path, got)
    for folder in (home, ledger, home / "applogs", home / "bundles", home / "secrets",
                   home / "log", home / "run", home / "agents", home / "appsdb"):
        if folder.exists():
            got = probe(port, "list", folder)
            assert not got["ok"] and got["error"] == "PermissionError", (folder, got)
    victim_files = home / "agents" / fleet.HOST
    for path in (victim_files / "homes" / victim, victim_files / "releases" / victim,
                 victim_files / "instances"):  # it named every instance on the host
        got = probe(port, "list", path)
        assert not got["ok"], (path, got)
    assert probe(two_apps["victim"], "list", "/")["ok"], "the probe itself works"


def test_database_logs_are_private_and_name_no_failed_statement(fleet: Fleet) -> None:
    """A failed statement's text (a lost append race carries a tenant's config values)
    never reaches the log, and the log is the server's alone."""
    secret = f"s3cret-{uid()}"
    conn = psycopg2.connect(fleet.cluster.dsn())
    with pytest.raises(psycopg2.Error), conn.cursor() as cur:
        cur.execute("SELECT 1 / 0 WHERE %s <> ''", (secret,))
    conn.close()
    for node in ("a", "b"):
        log = fleet.cluster.root / f"{node}.log"
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert secret not in log.read_text()
    assert stat.S_IMODE(fleet.cluster.root.stat().st_mode) & 0o007 == 0


# --- channels and processes: from inside one tenant's app, and from anyone ----------------


def test_only_the_agents_write_an_apps_logs(fleet: Fleet, two_apps: dict[str, Any]) -> None:
    """Anyone who reaches the collector (here this test: with no key, then with a keypair
    the platform never registered) tries to add lines to the victim's log and to move its
    instance's marks to an epoch its agent never reaches (suppressing its lines). The
    victim's own lines still arrive; no forged one does; no forger hears back."""
    import zmq

    from ledger import curve
    from tests.waiting import wait_until

    victim, iid = two_apps["victim_name"], two_apps["victim_iid"]
    mark = uid()
    public = curve.load_or_create(fleet.home / "secrets" / "collector.curve").public
    context = zmq.Context()
    forgers = []
    for keys in (None, zmq.curve_keypair()):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            curve.as_client(sock, curve.Client(public, curve.Keypair(*keys)))
        sock.connect(fleet.endpoint)
        forgers.append(sock)
    try:
        for n, sock in enumerate(forgers):
            with contextlib.suppress(zmq.Again):  # a refused handshake drops its queue
                sock.send_multipart([victim.encode(), f"{victim}.1.web.forged{n}".encode(),
                                     b"0", b"0", f"FORGED-{mark} by forger {n}\n".encode()],
                                    zmq.NOBLOCK)
                sock.send_multipart([victim.encode(), iid.encode(), b"999999999", b"0",
                                     b"x\n"], zmq.NOBLOCK)
        said = f"said-{mark}"
        assert probe(two_apps["victim"], "say", "", said)["ok"]
        log = fleet.home / "applogs" / victim / "current.log"
        wait_until(lambda: log.exists() and said in log.read_text(), 60,
                   "the victim's own line in its log (not suppressed)")
        assert f"FORGED-{mark}" not in log.read_text()
        assert [sock.poll(0) for sock in forgers] == [0, 0], "a forger was acknowledged"
    finally:
        for sock in forgers:
            sock.close()
        context.term()


def test_an_app_cannot_rewrite_its_log_nor_forge_the_agents_lines(
        fleet: Fleet, two_apps: dict[str, Any]) -> None:
    """The agent wrote an R14 line in the victim's log (written here as the agent writes
    it). The app then tries to empty its log through its stdout and stderr, to reopen it,
    to seek back in it, and prints a plain `tally: Error R14 ...` and a line starting with
    the agent's mark. Nothing of its log changes but its two lines; in the collected log the
    agent's line is the platform's (`tally[<instance>]`), both forgeries are the app's."""
    from agents import logpipe
    from tests.waiting import wait_until

    victim, iid = two_apps["victim_name"], two_apps["victim_iid"]
    mark = uid()
    instance_log = fleet.home / "agents" / fleet.HOST / "logs" / f"{iid}.log"
    logpipe.say(instance_log, f"Error R14 (Memory quota exceeded) {mark}")
    forged = f"tally: Error R14 (Memory quota exceeded) forged-{mark}\n\x1eforged-{mark}"
    tried = probe(two_apps["victim"], "tamper", "", forged)["result"]
    assert [tried[k] for k in ("truncate stdout", "truncate stderr", "seek stdout")] == [
        "OSError"] * 3, tried  # a pipe: EINVAL, EINVAL, ESPIPE (on the old file: done)
    assert logpipe.MARK + f"Error R14 (Memory quota exceeded) {mark}".encode() \
        in instance_log.read_bytes()
    collected = fleet.home / "applogs" / victim / "current.log"

    def both() -> list[str]:
        lines = collected.read_text().splitlines() if collected.exists() else []
        mine = [line for line in lines if mark in line]
        return mine if len(mine) == 3 else []
    lines = wait_until(both, 60, "the agent's line and the two forgeries collected")
    platform = [line for line in lines if line.split(" ")[1] == f"tally[{iid}]"]
    assert len(platform) == 1 and "forged" not in platform[0], lines
    assert [line.split(" ")[1] for line in lines if "forged" in line] == [iid, iid], lines
    from agents.processes import Processes  # the tail `tally ps` and `tally why` show

    tail = [line for line in Processes(instance_log.parent.parent).tail(iid) if mark in line]
    assert tail == [f"tally: Error R14 (Memory quota exceeded) {mark}",
                    f"app: tally: Error R14 (Memory quota exceeded) forged-{mark}",
                    f"app: \ufffdforged-{mark}"], tail


def test_logs_flow_on_through_an_agent_killed_9(fleet: Fleet,
                                                two_apps: dict[str, Any]) -> None:
    """The victim prints 150 numbered lines, one every 20 ms; its agent is killed -9 in
    the middle and started again. Every line reaches the collected log once, in order,
    and the victim never stopped (no exit: the relay writing its log is not the agent)."""
    from ledger import Ledger
    from tests.waiting import wait_until

    victim, iid = two_apps["victim_name"], two_apps["victim_iid"]
    mark = f"chatter-{uid()}"
    collected = fleet.home / "applogs" / victim / "current.log"

    def numbers() -> list[int]:
        text = collected.read_text() if collected.exists() else ""
        return [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if mark in line]
    assert probe(two_apps["victim"], "chatter", "", f"150:{mark}")["ok"]
    wait_until(lambda: len(numbers()) >= 10, 60, "the first lines collected")
    fleet.agent.kill()
    fleet.agent.start()
    wait_until(lambda: len(numbers()) >= 150, 90, "every line collected")
    assert numbers() == list(range(150))
    with Ledger(fleet.cluster.dsn()) as ledger:
        kinds = [e.type for e in ledger.read_stream(f"instance-{iid}")]
    assert "InstanceExited" not in kinds, kinds


def test_an_app_cannot_count_requests_for_another(fleet: Fleet,
                                                   two_apps: dict[str, Any]) -> None:
    """The attacker sends the victim's request metric to the statsd sink its own
    environment names; the victim's five real requests are counted, the forged 123,457
    are not."""
    from agents.stats import SampleStore
    from tests.waiting import wait_until

    victim, iid = two_apps["victim_name"], two_apps["victim_iid"]
    forged = probe(two_apps["attacker"], "statsd", "", f"{iid}.gunicorn.requests:123457|c")
    assert forged["ok"], forged  # it reached the sink: only who sent it decides
    for _ in range(5):
        assert probe(two_apps["victim"], "", "")["uid"]
    store = SampleStore(fleet.cluster.dsn())

    def requests() -> int:
        return sum(i["requests"] for i in store.read(victim, 30)["instances"]
                   if i["instance_id"] == iid)
    try:
        wait_until(lambda: requests() >= 5, 60, "the victim's own requests counted")
        assert requests() < 1000, "the attacker's forged count reached the victim's stats"
    finally:
        store.close()


def test_an_app_sees_no_other_process(fleet: Fleet, two_apps: dict[str, Any]) -> None:
    """Command lines and environments of the victim's instance, of the platform's root
    processes (this test, pid 1): invisible from inside the attacker's app; its own
    process it still sees."""
    port = two_apps["attacker"]
    victim_pid = fleet.agent.app_pids()[two_apps["victim_iid"]]
    for pid in (victim_pid, os.getpid(), 1):
        for what in ("cmdline", "environ"):
            got = probe(port, "read", f"/proc/{pid}/{what}")
            assert not got["ok"], (pid, what, got)
    listed = probe(port, "list", "/proc")
    assert listed["ok"], listed
    assert not {victim_pid, os.getpid(), 1} & {int(n) for n in listed["result"] if n.isdigit()}
    own = probe(port, "read", "/proc/self/cmdline")
    assert own["ok"] and "gunicorn" in own["result"], own


def test_a_web_command_that_binds_port_itself_gets_it_at_its_first_start_and_only_there(
        fleet: Fleet, two_apps: dict[str, Any]) -> None:
    """The victim's web command is not gunicorn (`python serve.py` binding 0.0.0.0:$PORT
    itself, as a Heroku-style app does), and it binds two seconds after it starts: a wide
    window. The attacker tries to take that port the moment the agent lets it go, again
    and again: every bind is refused (EPERM: the kernel reserves the port for the victim's
    uid), the victim's first start gets its port (no exit, no restart) and answers at the
    agent's address as itself, and at no other address of this host."""
    import socket

    import psutil

    from ledger import Ledger
    from tests.waiting import wait_until

    port = fleet.range[1]  # the last of the range: no other test's
    note = Path("/tmp") / f"tally-squat-{uid()}"
    assert probe(two_apps["attacker"], "squat", note, str(port))["ok"]
    try:
        _, victim_uid, iid = fleet.deploy(f"bind-{uid()}", "sleep 2 && exec python serve.py",
                                          port)
        assert probe(port, "", "")["uid"] == victim_uid
        with Ledger(fleet.cluster.dsn()) as ledger:
            events = ledger.read_stream(f"instance-{iid}")
        kinds = [e.type for e in events]
        assert "InstanceExited" not in kinds, f"the victim's first start failed: {kinds}: " \
            f"{[e.data.get('log_tail', [])[-3:] for e in events if e.type == 'InstanceExited']}"
        assert kinds.count("InstanceStarted") == 1, kinds
        attacker = two_apps["attacker"]  # the note is in its own private /tmp
        wait_until(lambda: probe(attacker, "read", note)["ok"], 10, "the attacker's squat noted")
        noted = probe(attacker, "read", note)["result"].splitlines()
        assert "bound" not in noted, f"the squatter took the victim's port: {noted}"
        assert "refused EPERM" in noted, noted
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]
        for address in others:
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass
    finally:
        note.unlink(missing_ok=True)


def test_an_apps_temporary_folders_are_its_own(fleet: Fleet,
                                                two_apps: dict[str, Any]) -> None:
    """The review's case: tenants shared the host's /tmp, /var/tmp and /dev/shm with umask
    022, so a temp file written without a mode was every tenant's to read, and a
    predictable path (Django's /var/tmp/django_cache) another's to take first."""
    victim, attacker = two_apps["victim"], two_apps["attacker"]
    mark = uid()
    for folder in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        path = Path(folder) / f"tally-temp-{mark}"
        assert probe(victim, "write", path, "the victim's secret")["ok"], folder
        assert probe(victim, "read", path)["result"] == "the victim's secret"
        assert not probe(attacker, "read", path)["ok"], f"another app read {path}"
        assert not path.exists(), f"{path} reached the host's {folder}"
    assert probe(victim, "umask", "")["result"] == 0o077


def memory_used(pid: int) -> int:
    """Bytes charged to the process's memory cgroup (v1 here, v2 where the host has it)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int((Path("/sys/fs/cgroup/memory") / path.lstrip("/") /
                        "memory.usage_in_bytes").read_text())
        if number == "0" and not controllers:
            return int((Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current")
                       .read_text())
    raise LookupError(f"no memory cgroup for {pid}")


def test_an_app_that_fills_its_disk_gets_enospc_and_no_one_else_is_affected(
        fleet: Fleet, two_apps: dict[str, Any]) -> None:
    """The review's disk fill: the attacker writes 1 MiB files into /app, /tmp and
    /var/tmp until the system refuses (or its size's limit and 64 MiB more are written).
    Each write past the instance's `disk_mb` fails with ENOSPC, in the attacker alone:
    nothing reached the host's disk (its layer's folder there stays empty), the agent
    said R18 in its log, the files are charged to the attacker's memory cgroup, the victim
    still writes its own files and answers, and the attacker itself runs on (a full disk
    is its error, not a crash)."""
    import errno

    from agents import cgroups, logpipe
    from ledger import Ledger
    from ledger.sizes import size_of
    from tests.waiting import wait_until

    attacker, victim, iid = two_apps["attacker"], two_apps["victim"], two_apps["attacker_iid"]
    limit = size_of(None).disk_mb
    layer = fleet.home / "agents" / fleet.HOST / "instances" / iid
    instance_log = fleet.home / "agents" / fleet.HOST / "logs" / f"{iid}.log"

    def on_host_disk() -> int:
        return sum(p.lstat().st_size for p in layer.rglob("*"))

    def told() -> bool:
        lines = logpipe.lines(instance_log.read_bytes()) if instance_log.exists() else []
        return any(ours and "Error R18 (Disk quota exceeded)" in text for ours, text in lines)
    try:
        for n, folder in enumerate(("/app", "/tmp", "/var/tmp")):
            got = probe(attacker, "fill", folder, str(limit + 64), timeout=120)
            assert got.get("errno") == errno.ENOSPC, (folder, got)
            assert limit - 64 <= got["written_mb"] <= limit, (folder, got)
            assert on_host_disk() < 2**20, f"writes to {folder} reached the host's disk"
            if n == 0:
                wait_until(told, 60, "the agent's R18 line in the attacker's log")
                if cgroups.missing() is None:  # its files count against its memory
                    assert memory_used(fleet.agent.app_pids()[iid]) >= got["written_mb"] * 2**20
            assert probe(victim, "write", f"/tmp/mine-{n}", "the victim's")["ok"]
            assert probe(attacker, "unfill", folder, "")["ok"]
        assert probe(attacker, "write", "/app/after", "room again")["ok"]
    finally:
        for folder in ("/app", "/tmp", "/var/tmp"):
            with contextlib.suppress(OSError):
                probe(attacker, "unfill", folder, "", timeout=30)
    with Ledger(fleet.cluster.dsn()) as ledger:
        kinds = [e.type for n in ("attacker_iid", "victim_iid")
                 for e in ledger.read_stream(f"instance-{two_apps[n]}")]
    assert "InstanceExited" not in kinds, kinds


def test_an_app_that_prints_without_end_fills_no_disk(fleet: Fleet,
                                                       two_apps: dict[str, Any]) -> None:
    """The attacker prints 48 MiB at once. Its log on the host never holds more than the
    relay's budget lets through (an 8 MiB burst and 1 MiB/s), the agent's L10 line says
    what was dropped, and the victim's own lines still arrive."""
    from agents import logpipe
    from tests.waiting import wait_until

    attacker, iid = two_apps["attacker"], two_apps["attacker_iid"]
    mark = uid()
    instance_log = fleet.home / "agents" / fleet.HOST / "logs" / f"{iid}.log"
    budget, began = logpipe.Budget(), time.monotonic()
    assert probe(attacker, "flood", "", f"48:{mark}", timeout=120)["ok"]

    def said() -> list[str]:
        data = instance_log.read_bytes() if instance_log.exists() else b""
        most = budget.burst + budget.rate * (time.monotonic() - began + 1) + 2**16
        assert len(data) <= most, f"{len(data)} bytes in the log: more than the relay lets by"
        return [text for ours, text in logpipe.lines(data[-65536:])
                if ours and text.startswith("Error L10 (output buffer overflow)")]
    wait_until(said, 60, "the agent's L10 line in the attacker's log")
    victim_said = f"calm-{mark}"
    assert probe(two_apps["victim"], "say", "", victim_said)["ok"]
    collected = fleet.home / "applogs" / two_apps["victim_name"] / "current.log"
    wait_until(lambda: collected.exists() and victim_said in collected.read_text(), 60,
               "the victim's line collected")


# --- identities ----------------------------------------------------------------------------


def test_app_uids_come_from_the_ledger_and_are_never_handed_out_twice(
        world: World) -> None:  # noqa: F811
    def created_uid(name: str) -> int:
        events = world.ledger.read_stream(f"app-{name}")
        return [e.data["uid"] for e in events if e.type == "AppCreated"][-1]

    first = f"uid-{uid()}"
    assert world.call("owner", "POST", "/apps", {"name": first}).status_code == 201
    given = [created_uid(first)]
    assert world.call("owner", "DELETE", f"/apps/{first}").status_code == 204
    second = f"uid-{uid()}"
    assert world.call("other", "POST", "/apps", {"name": second}).status_code == 201
    given.append(created_uid(second))
    assert world.call("owner", "POST", "/apps", {"name": first}).status_code == 201
    given.append(created_uid(first))
    assert given == sorted(set(given)), "each new app a new uid, a re-created name too"
    refused = world.call("other", "POST", "/apps", {"name": second})
    assert refused.status_code == 409
    allocations = world.ledger.read_stream("uids-apps")
    assert [e.data["uid"] for e in allocations][-3:] == given, "a refused create takes none"


def test_an_app_runs_as_the_uid_the_ledger_gave_it(fleet: Fleet,
                                                   two_apps: dict[str, Any]) -> None:
    with Ledger(fleet.cluster.dsn()) as ledger:
        for role in ("victim", "attacker"):
            created = ledger.read_stream(f"app-{two_apps[role + '_name']}")[0]
            assert probe(two_apps[role], "", "")["uid"] == created.data["uid"]


def test_a_uid_another_user_holds_is_refused(tmp_path: Path) -> None:
    from agents import users

    if os.geteuid() != 0:
        pytest.skip("needs root: app users exist only when the agent is root")
    nobody = pwd.getpwnam("nobody").pw_uid
    with pytest.raises(OSError, match="nobody has it"):
        users.ensure(f"x-{uid()}", tmp_path, nobody)


def test_a_deleted_apps_user_goes_with_its_processes_and_files_everywhere(
        fleet: Fleet) -> None:
    """A process it left behind goes with it, and its user. (Its temporary files were in
    its instance's own folders, never the host's: test_an_apps_temporary_folders_are_its_own;
    files a deleted app left in the host's, from before, are removed by users.remove:
    test_removing_a_deleted_apps_files_never_follows_a_swapped_folder.)"""
    from agents import users
    from tests.waiting import wait_until

    name = f"gone-{uid()}"
    port, app_uid, iid = fleet.deploy(name)
    stray = probe(port, "spawn", "", "")["result"]
    assert psutil.Process(stray).uids().real == app_uid
    fleet.delete(name, iid)
    wait_until(lambda: users._entry(app_user(name)) is None, 60,
               "the deleted app's user removed by the agent's cleanup")
    assert not [p for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == app_uid]


def test_removing_a_deleted_apps_files_never_follows_a_swapped_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deleted app left `shared/sub/passwd` in a folder another app (of the same
    tenant, say) owns; that app swaps `sub` for a link to a folder of root's at the worst
    moment: after root looked at `passwd`, before it removes it. Root's file of that name
    stays; the deleted app's goes. (The racing app is played by a hook on os.stat, the one
    call both the look and fwalk make: a real race cannot be won on cue.)"""
    from agents import users

    if os.geteuid() != 0:
        pytest.skip("needs root: files of other uids")
    gone, other = 3_999_001, 3_999_002  # uids no user of this machine has
    top, roots = tmp_path / "tmp", tmp_path / "etc"
    sub = top / "shared" / "sub"
    sub.mkdir(parents=True)
    roots.mkdir()
    (roots / "passwd").write_text("root's\n")
    (sub / "passwd").write_text("left behind\n")
    for path, owner in ((top / "shared", other), (sub, other), (sub / "passwd", gone)):
        os.chown(path, owner, owner)
    real_stat = os.stat

    def racing_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        result = real_stat(path, *args, **kwargs)
        if not isinstance(path, int) and os.fspath(path).endswith("passwd") \
                and not (top / "shared" / "real").exists():
            sub.rename(top / "shared" / "real")
            sub.symlink_to(roots)
        return result

    monkeypatch.setattr(os, "stat", racing_stat)
    users.remove_files_of(gone, top)
    monkeypatch.undo()
    assert (roots / "passwd").read_text() == "root's\n"
    assert (top / "shared" / "real").exists(), "the race was run"
    assert not (top / "shared" / "real" / "passwd").exists()

