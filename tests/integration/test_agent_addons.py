"""`tally addons:create APP postgresql`: a database and role in the apps cluster (not the
ledger's), DATABASE_URL set as a config var with a new release; one app's URL opens no
other app's database. Through the API (the API host creates the database), as from a
developer's machine."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psycopg2
import pytest

from agents.fleet import Fleet
from agents.placer import catch_up
from api.auth import create_user
from ledger import Ledger
from ledger.cluster import Cluster, ClusterSpec
from tests.api_process import ApiProcess
from tests.conftest import destroy_cluster, free_ports, make_cluster, tally_env
from tests.fixtures.apps.fleet import create_app, release


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[Cluster, dict[str, str]]]:
    c = make_cluster()
    ports = free_ports(2)
    api = ApiProcess(tally_env(c, TALLY_APPS_DB_PORTS=f"{ports[0]},{ports[1]}",
                               TALLY_APPS_DB_PORT=str(free_ports(1)[0]), TALLY_APPS_HA="plain"),
                     free_ports(1)[0])
    api.wait_ready()
    with Ledger(c.dsn()) as ledger:
        token = create_user(ledger, "root", "admin")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
           "TALLY_API": api.url, "TALLY_TOKEN": token}
    yield c, env
    api.stop()
    apps = Cluster(ClusterSpec(c.root.parent / "appsdb", ports=(ports[0], ports[1])))
    apps.destroy()
    destroy_cluster(c)


def addon(env: dict[str, str], app: str, kind: str = "postgresql") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tally.cli", "addons:create", app, kind],
                          capture_output=True, text=True, env=env, timeout=120)


def test_each_app_gets_its_own_database_and_url(
        private: tuple[Cluster, dict[str, str]]) -> None:
    cluster, env = private
    with Ledger(cluster.dsn()) as ledger:
        for app in ("shop", "blog"):
            create_app(ledger, app, {"GREETING": "hi"})
            release(ledger, cluster.root.parent, app, "hello", 1, config_version=1)
        for app in ("shop", "blog"):
            out = addon(env, app)
            assert out.returncode == 0, out.stderr
        fleet = Fleet()
        catch_up(ledger, fleet)
    urls = {}
    for app in ("shop", "blog"):
        a = fleet.apps[app]
        (r2,) = [r for n, r in a.releases.items() if n == 2]  # a new release carries it
        config = a.config_at(r2.config_version)
        assert config["GREETING"] == "hi"
        urls[app] = config["DATABASE_URL"]
        assert f":{cluster.spec.ports[0]}" not in urls[app]  # not the ledger
    with psycopg2.connect(urls["shop"]) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (id int)")
        cur.execute("INSERT INTO orders VALUES (1)")
    assert urls["blog"].endswith("/app_blog") and "," not in urls["blog"]  # one host
    blog_to_shop = urls["blog"].rsplit("/", 1)[0] + "/app_shop"
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        psycopg2.connect(blog_to_shop).close()


def test_bad_addon_requests_fail_with_one_clear_line(
        private: tuple[Cluster, dict[str, str]]) -> None:
    _, env = private
    again = addon(env, "shop")
    assert again.returncode == 1 and "already has postgresql-shop" in again.stderr
    missing = addon(env, "nosuch")
    assert missing.returncode == 1 and "no app named 'nosuch'" in missing.stderr
    kind = addon(env, "shop", "memcached")
    assert kind.returncode == 2 and "'memcached' is not an add-on tally has" in kind.stderr
    assert "Traceback" not in again.stderr + missing.stderr + kind.stderr


def test_an_apps_cluster_that_cannot_start_is_a_503_not_a_500(tmp_path) -> None:
    """Where the apps' cluster cannot be made (here its folder is a file), the API answers
    503 naming the cause; schemathesis found this a 500."""
    from api.errors import Unavailable
    from tally.api_settings import addon_database

    (tmp_path / "appsdb").write_text("not a folder")
    cluster = Cluster(ClusterSpec(tmp_path / "appsdb", ports=tuple(free_ports(2))))
    with pytest.raises(Unavailable, match="apps' database cluster is not available"):
        addon_database(cluster, "shop")
