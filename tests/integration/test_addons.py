"""Add-ons with a lifecycle, through a real API and the CLI: create, list, attach to another
app of the same owner, detach, destroy (with confirmation), an app's deletion destroying
its own; Redis (one redis-server per app) with its password and ACL, and a Celery worker
using it as its broker. Tenants are hostile: another owner's people and apps reach, list
and attach nothing, and one app's credentials open no other app's data.

The apps' cluster here is plain (TALLY_APPS_HA=plain: no Patroni bootstrap per module);
Patroni, HAProxy and failover are tests/integration/test_appsdb.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import psycopg2
import pytest
import redis
import requests

from agents import redisaddon
from api.auth import create_user
from ledger import Ledger, NewEvent
from ledger.cluster import Cluster, ClusterSpec
from tests.api_process import ApiProcess
from tests.conftest import destroy_cluster, free_port_range, free_ports, make_cluster, tally_env
from tests.waiting import wait_until


@dataclass
class Platform:
    cluster: Cluster
    api: ApiProcess
    tokens: dict[str, str]
    apps_db: Cluster
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.cluster.root.parent

    def call(self, who: str, method: str, path: str, body: dict | None = None
             ) -> requests.Response:
        return requests.request(method, self.api.url + path, json=body, timeout=120,
                                headers={"Authorization": f"Bearer {self.tokens[who]}"})

    def tally(self, who: str, *args: str) -> subprocess.CompletedProcess:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
               "TALLY_API": self.api.url, "TALLY_TOKEN": self.tokens[who]}
        return subprocess.run([sys.executable, "-m", "tally.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300)

    def config(self, app: str) -> dict[str, str]:
        r = self.call("ann", "GET", f"/apps/{app}/config")
        assert r.status_code == 200, r.text
        return r.json()["config"]

    def events(self, app: str) -> list[str]:
        with Ledger(self.cluster.dsn()) as ledger:
            return [e.type for e in ledger.read_stream(f"app-{app}")
                    if e.type.startswith("Addon")]


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    c = make_cluster()
    db_a, db_b, proxy, api_port = free_ports(4)
    low, high = free_port_range(6)
    env = tally_env(c, TALLY_APPS_DB_PORTS=f"{db_a},{db_b}", TALLY_APPS_DB_PORT=str(proxy),
                    TALLY_APPS_HA="plain", TALLY_REDIS_PORTS=f"{low}-{high}")
    api = ApiProcess(env, api_port)
    try:
        api.wait_ready()
        with Ledger(c.dsn()) as ledger:
            tokens = {"root": create_user(ledger, "root", "admin"),
                      "ann": create_user(ledger, "ann", "member"),
                      "bob": create_user(ledger, "bob", "member")}
        p = Platform(c, api, tokens, Cluster(ClusterSpec(c.root.parent / "appsdb",
                                                         ports=(db_a, db_b))), env)
        for who, app in (("ann", "blog"), ("ann", "shop"), ("bob", "evil")):
            r = p.call(who, "POST", "/apps", {"name": app})
            assert r.status_code == 201, r.text
        yield p
    finally:
        api.stop()
        redisaddon.stop_all(c.root.parent / "redis")
        Cluster(ClusterSpec(c.root.parent / "appsdb", ports=(db_a, db_b))).destroy()
        destroy_cluster(c)


def _connects(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError:
        return False
    return True


def test_create_list_attach_detach_and_destroy_through_the_cli(platform: Platform) -> None:
    p = platform
    made = p.tally("ann", "addons:create", "-a", "blog", "postgresql")
    assert made.returncode == 0, made.stderr
    assert "Creating postgresql-blog... done" in made.stderr
    assert "DATABASE_URL is set" in made.stderr
    url = p.config("blog")["DATABASE_URL"]
    listed = p.tally("ann", "addons", "-a", "blog", "--json")
    (row,) = json.loads(listed.stdout)
    assert row["name"] == "postgresql-blog" and row["state"] == "created"
    assert (row["kind"], row["plan"], row["config_var"], row["owner"]) == (
        "postgresql", "standard", "DATABASE_URL", "blog")
    assert row["where"] == f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}"
    assert "postgresql-blog" in p.tally("ann", "addons", "-a", "blog").stdout

    shared = p.tally("ann", "addons:attach", "-a", "shop", "postgresql-blog", "--as",
                     "BLOG_DATABASE")
    assert shared.returncode == 0, shared.stderr
    assert "Attaching postgresql-blog to shop... done" in shared.stderr
    assert "BLOG_DATABASE_URL is set" in shared.stderr
    assert p.config("shop")["BLOG_DATABASE_URL"] == url
    (att,) = p.call("ann", "GET", "/apps/shop/addons").json()["addons"]
    assert (att["state"], att["owner"]) == ("attached", "blog")

    unconfirmed = p.tally("ann", "addons:destroy", "-a", "blog", "postgresql-blog")
    assert unconfirmed.returncode == 1 and "--confirm blog" in unconfirmed.stderr
    not_its = p.tally("ann", "addons:destroy", "-a", "shop", "postgresql-blog",
                      "--confirm", "shop")
    assert not_its.returncode == 1 and "belongs to blog" in not_its.stderr
    assert _connects(url), "nothing was destroyed by the refusals"

    gone = p.tally("ann", "addons:destroy", "-a", "blog", "postgresql-blog",
                   "--confirm", "blog")
    assert gone.returncode == 0, gone.stderr
    assert "Destroying postgresql-blog on blog... done" in gone.stderr
    assert not _connects(url), "its credentials open nothing any more"
    assert "DATABASE_URL" not in p.config("blog")
    assert "BLOG_DATABASE_URL" not in p.config("shop"), "detached from the apps sharing it"
    assert p.events("blog") == ["AddonCreated", "AddonDestroyed", "AddonDropped"]
    assert p.events("shop") == ["AddonAttached", "AddonDetached"]

    again = p.tally("ann", "addons:create", "-a", "blog", "postgresql")
    assert again.returncode == 0, again.stderr
    assert p.config("blog")["DATABASE_URL"] != url and _connects(p.config("blog")["DATABASE_URL"])
    p.tally("ann", "addons:attach", "-a", "shop", "postgresql-blog")
    detached = p.tally("ann", "addons:detach", "-a", "shop", "postgresql-blog")
    assert detached.returncode == 0, detached.stderr
    assert "Detaching postgresql-blog from shop... done" in detached.stderr
    assert "DATABASE_URL" not in p.config("shop")


def test_another_owner_reaches_lists_attaches_and_destroys_nothing(platform: Platform) -> None:
    p = platform
    if "DATABASE_URL" not in p.config("blog"):
        assert p.call("ann", "POST", "/apps/blog/addons", {"kind": "postgresql"}).ok
    url = p.config("blog")["DATABASE_URL"]
    for method, path, body in (
            ("GET", "/apps/blog/addons", None),
            ("POST", "/apps/blog/addons", {"kind": "redis"}),
            ("DELETE", "/apps/blog/addons/postgresql-blog", None),
            ("POST", "/apps/evil/attachments", {"addon": "postgresql-blog"})):
        r = p.call("bob", method, path, body)
        assert r.status_code == 403, (method, path, r.text)
        assert "message" in r.json()
    # An admin may manage both apps, but they have different owners.
    r = p.call("root", "POST", "/apps/evil/attachments", {"addon": "postgresql-blog"})
    assert r.status_code == 409 and "different owners" in r.json()["message"]
    assert "DATABASE_URL" not in p.call("bob", "GET", "/apps/evil/config").json()["config"]
    # bob's app, with his database, cannot open blog's.
    assert p.call("bob", "POST", "/apps/evil/addons", {"kind": "postgresql"}).status_code == 201
    evil = p.call("bob", "GET", "/apps/evil/config").json()["config"]["DATABASE_URL"]
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(evil.rsplit("/", 1)[0] + "/app_blog", connect_timeout=5).close()
    assert _connects(url)
    for method, path, body, status in (
            ("POST", "/apps/blog/addons", {"kind": "postgresql", "plan": "huge"}, 422),
            ("POST", "/apps/blog/addons", {"kind": "memcached"}, 422),
            ("POST", "/apps/blog/addons", {"kind": "postgresql"}, 409),
            ("DELETE", "/apps/blog/addons/redis-nosuch", None, 404),
            ("DELETE", "/apps/shop/attachments/postgresql-blog", None, 404),
            ("POST", "/apps/shop/attachments", {"addon": "nonsense"}, 404),
            ("POST", "/apps/shop/attachments", {"addon": "postgresql-nosuch"}, 404),
            ("POST", "/apps/shop/attachments", {"addon": "postgresql-blog", "as": "x y"}, 422)):
        r = p.call("ann", method, path, body)
        assert r.status_code == status, (path, body, r.text)
        assert r.json()["message"]


def test_redis_per_app_with_its_password_and_no_admin_commands(platform: Platform) -> None:
    p = platform
    for app in ("blog", "shop"):
        r = p.tally("ann", "addons:create", "-a", app, "redis", "--plan", "mini")
        assert r.returncode == 0 and "REDIS_URL is set" in r.stderr, r.stderr
    blog, shop = (redis.Redis.from_url(p.config(a)["REDIS_URL"]) for a in ("blog", "shop"))
    try:
        blog.set("orders", "42")
        assert blog.get("orders") == b"42" and shop.get("orders") is None, "own instances"
        shop_port = shop.connection_pool.connection_kwargs["port"]
        blog_password = blog.connection_pool.connection_kwargs["password"]
        with pytest.raises(redis.AuthenticationError):  # blog's password on shop's Redis
            redis.Redis(port=shop_port, username="app", password=blog_password).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=shop_port).get("orders")  # the default user is off
        for admin in (("CONFIG", "SET", "dir", "/tmp"), ("BGSAVE",),
                      ("SHUTDOWN",), ("ACL", "LIST"), ("MONITOR",),
                      ("MIGRATE", "127.0.0.1", str(shop_port), "k", "0", "1000")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                blog.execute_command(*admin)
        conf = (p.home / "redis" / "blog" / "redis.conf").read_text()
        assert "maxmemory 25mb" in conf and "appendonly yes" in conf
        filled = [f"fill-{n}" for n in range(40)]  # 40 MiB into a 25 MiB plan
        with pytest.raises(redis.exceptions.ResponseError,
                           match="not allowed when used memory > 'maxmemory'"):
            for key in filled:
                blog.set(key, b"x" * 2**20)
        shop.set("still", "fine")  # the neighbour writes on
        blog.delete(*filled)
        blog.set("room", "again")
        assert oct((p.home / "redis" / "blog").stat().st_mode & 0o777) == "0o700"
    finally:
        blog.close()
        shop.close()


def test_deleting_an_app_leaves_no_database_role_or_redis(platform: Platform) -> None:
    p = platform
    assert p.call("ann", "POST", "/apps", {"name": "temp"}).status_code == 201
    for kind in ("postgresql", "redis"):
        r = p.call("ann", "POST", "/apps/temp/addons", {"kind": kind})
        assert r.status_code == 201, r.text
    config = p.config("temp")
    r = p.call("ann", "POST", "/apps/shop/attachments", {"addon": "postgresql-temp",
                                                          "as": "TEMP_DB"})
    assert r.status_code == 201, r.text
    deleted = p.tally("ann", "apps:delete", "-a", "temp", "--confirm", "temp")
    assert deleted.returncode == 0, deleted.stderr
    assert not _connects(config["DATABASE_URL"])
    with psycopg2.connect(p.apps_db.node_dsn(p.apps_db.primary(), "postgres", "postgres")
                          ) as conn, conn.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM pg_roles WHERE rolname = 'app_temp') + "
                    "(SELECT count(*) FROM pg_database WHERE datname = 'app_temp')")
        assert cur.fetchone() == (0,), "no role, no database"
    conn.close()
    assert not (p.home / "redis" / "temp").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(config["REDIS_URL"], socket_connect_timeout=2).ping()
    assert "TEMP_DB_URL" not in p.config("shop"), "detached from the app sharing it"
    assert p.events("temp")[-4:] == ["AddonDestroyed", "AddonDestroyed", "AddonDropped",
                                     "AddonDropped"]
    with Ledger(p.cluster.dsn()) as ledger:  # each taken once more, before it was dropped
        for target in ("addon:temp", "redis:temp"):
            kept = [e for e in ledger.read_stream(f"backup-{target}")
                    if e.type == "BackupVerified"]
            assert kept, f"no final backup of {target}"


def test_addons_survive_a_stop_and_start_with_the_same_urls(platform: Platform) -> None:
    """`tally down` then `tally up` (their add-on halves: platform.stop_addons and
    start_addons): every app's DATABASE_URL and REDIS_URL answer as before, with the data
    (Redis's AOF), and `addons:create` does not refuse."""
    from tally.config import Config
    from tally.platform import start_addons, stop_addons

    p = platform
    for kind in ("postgresql", "redis"):
        if kind not in {a["kind"] for a in p.call("ann", "GET", "/apps/shop/addons").json()[
                "addons"] if a["state"] == "created"}:
            assert p.call("ann", "POST", "/apps/shop/addons", {"kind": kind}).ok
    urls = p.config("shop")
    r = redis.Redis.from_url(urls["REDIS_URL"])
    r.set("kept", "yes")
    r.close()
    env = tally_env(p.cluster, TALLY_APPS_DB_PORTS=",".join(map(str, p.apps_db.spec.ports)),
                    TALLY_APPS_HA="plain", TALLY_REDIS_PORTS="1-2")
    cfg = Config.from_env(env)
    stop_addons(cfg)
    assert not _connects(urls["DATABASE_URL"])
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(urls["REDIS_URL"], socket_connect_timeout=2).ping()
    lines = start_addons(cfg)
    assert any("apps' database cluster" in line for line in lines), lines
    assert any("Redis add-ons" in line and "shop" in line for line in lines), lines
    assert p.config("shop") == urls, "the same URLs"
    assert _connects(urls["DATABASE_URL"])
    r = redis.Redis.from_url(urls["REDIS_URL"])
    assert r.get("kept") == b"yes", "Redis's data survived (AOF)"
    r.close()
    made = p.tally("ann", "addons:create", "-a", "evil", "redis")
    assert made.returncode == 1 and "not the owner or a member" in made.stderr  # bob's app
    assert p.tally("bob", "addons:create", "-a", "evil", "redis").returncode == 0


def test_a_drop_that_failed_is_retried_by_the_reaper_then_the_addon_can_be_made_again(
        platform: Platform) -> None:
    """Before: a drop that failed after AddonDestroyed left the database for an operator,
    and every later addons:create of it answered 409. Now the add-ons' reaper (tally serve
    addons) drops it from the ledger's word, records AddonDropped, and create works."""
    from agents.addonreaper import Reaper
    from tally.api_settings import drop_addon
    from tally.config import Config

    p = platform
    assert p.call("ann", "POST", "/apps", {"name": "kept"}).status_code == 201
    assert p.call("ann", "POST", "/apps/kept/addons", {"kind": "postgresql"}).status_code == 201
    admin = psycopg2.connect(p.apps_db.node_dsn(p.apps_db.primary(), "postgres", "postgres"))
    admin.autocommit = True
    with admin.cursor() as cur:  # a real failure: PostgreSQL drops no template database
        cur.execute("ALTER DATABASE app_kept IS_TEMPLATE true")
    r = p.call("ann", "DELETE", "/apps/kept/addons/postgresql-kept")
    assert r.status_code == 503 and "retries" in r.json()["message"], r.text
    assert p.events("kept")[-1] == "AddonDestroyed"
    r = p.call("ann", "POST", "/apps/kept/addons", {"kind": "postgresql"})
    assert r.status_code == 409 and "not dropped yet" in r.json()["message"], r.text

    with Ledger(p.cluster.dsn()) as ledger:
        reaper = Reaper(ledger, partial(drop_addon, Config.from_env(p.env)),
                        grace=timedelta(0))
        now = datetime.now(UTC)
        assert reaper.tick(now) == [], "still a template: the retry fails and waits"
        assert reaper.tick(now + timedelta(seconds=1)) == [], "backing off"
        with admin.cursor() as cur:
            cur.execute("ALTER DATABASE app_kept IS_TEMPLATE false")
        assert reaper.tick(now + timedelta(hours=1)) == ["postgresql-kept"]
        assert reaper.tick(now + timedelta(hours=2)) == [], "dropped once"
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = 'app_kept'")
        assert cur.fetchone() == (0,)
    admin.close()
    assert p.events("kept")[-1] == "AddonDropped"
    r = p.call("ann", "POST", "/apps/kept/addons", {"kind": "postgresql"})
    assert r.status_code == 201, r.text
    assert _connects(p.config("kept")["DATABASE_URL"])


def test_the_reaper_daemon_records_a_drop_with_no_relay_running(platform: Platform) -> None:
    """`tally serve addons` as `tally up` runs it: it sequences the ledger itself (no relay
    here), finds an add-on destroyed and not dropped (its Redis already gone), records
    AddonDropped, and stops cleanly on SIGTERM."""
    p = platform
    with Ledger(p.cluster.dsn()) as ledger:
        ledger.append("app-ghost", [
            NewEvent("AppCreated", {"name": "ghost", "owner": "ann"}),
            NewEvent("AddonDestroyed", {"app": "ghost", "addon": "redis-ghost",
                                        "kind": "redis"})])
    daemon = subprocess.Popen([sys.executable, "-m", "tally.cli", "serve", "addons", "--every",
                               "0.2s", "--grace", "0s"], env=p.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: p.events("ghost")[-1:] == ["AddonDropped"], 60,
                   "the reaper's AddonDropped")
    finally:
        daemon.terminate()
        out = daemon.communicate(timeout=30)[0]
    assert daemon.returncode == 0, out
    assert "dropped redis-ghost" in out
