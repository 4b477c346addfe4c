"""The apps' PostgreSQL cluster under Patroni (its own scope and etcd) behind its stable
address (the kernel NAT as root, agents/dbroute.py): a standard single-host DATABASE_URL
that the usual parsers take, which keeps working across a failover (the app loses its open
connections, never its URL) and across a stop and start; an app reaches the primary by the
stable port and no node's own port.

Real Patroni, etcd, nftables and PostgreSQL; one cluster for the module."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dj_database_url
import psutil
import psycopg
import psycopg2
import pytest
import sqlalchemy

from agents import addons, appsdb, dbroute, netrules
from ledger.cluster import Cluster, ClusterSpec
from tests.conftest import free_ports
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def apps() -> Iterator[appsdb.AppsCluster]:
    home = Path(tempfile.mkdtemp(prefix="tally-appsdb-"))
    home.chmod(0o755)
    a, b, proxy, *ha_ports = free_ports(7)
    cluster = appsdb.AppsCluster(
        ClusterSpec(home / "appsdb", ports=(a, b), dbname="tally_apps", ledger=False,
                    extra_settings=dict(appsdb.PRIVATE_LOGS), os_user=appsdb.SERVER_USER),
        (ha_ports[0], ha_ports[1], ha_ports[2], ha_ports[3]), proxy_port=proxy)
    cluster.init()
    cluster.ha.wait_members(2, 120)
    yield cluster
    cluster.destroy()
    shutil.rmtree(home, ignore_errors=True)


def test_the_database_url_is_one_standard_host_that_django_sqlalchemy_and_psycopg_take(
        apps: appsdb.AppsCluster) -> None:
    """Before: a multi-host URL (`h1:5443,h2:5444/db?target_session_attrs=...`) that
    dj-database-url refuses (ParseError), so a stock Django project failed to deploy."""
    with pytest.raises(dj_database_url.ParseError):
        dj_database_url.parse("postgresql://u:p@127.0.0.1:5443,127.0.0.1:5444/db"
                              "?target_session_attrs=read-write")
    url = addons.create_database(apps, "django")
    django = dj_database_url.parse(url)
    assert django["ENGINE"] == "django.db.backends.postgresql"
    assert (django["HOST"], django["PORT"]) == ("127.0.0.1", apps.proxy_port)
    assert django["NAME"] == django["USER"] == "app_django"
    assert "?" not in url and "," not in url
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE hits (n int)"))
            conn.execute(sqlalchemy.text("INSERT INTO hits VALUES (1)"))
    finally:
        engine.dispose()
    with psycopg.connect(url) as conn3:  # psycopg 3 (SQLAlchemy's default driver)
        assert conn3.execute("SELECT sum(n), pg_is_in_recovery() FROM hits").fetchone() == (
            1, False), "the stable address is the primary"
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM hits")
        assert cur.fetchone() == (1,)
    conn.close()


def test_a_failover_costs_the_app_its_open_connections_never_its_url(
        apps: appsdb.AppsCluster) -> None:
    """kill -9 of the leader's postmaster: the app's open connection breaks, it reconnects
    through the same URL and writes on the new leader within seconds; every write that was
    acknowledged is there."""
    url = addons.create_database(apps, "shop")
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE orders (n int PRIMARY KEY)")
        for n in range(50):
            cur.execute("INSERT INTO orders VALUES (%s)", (n,))
    old = apps.primary()
    os.kill(appsdb.leader_postmaster(apps), signal.SIGKILL)

    def lost() -> bool:  # the open connection breaks (its backend sees the postmaster gone)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        except psycopg2.Error:
            return True
        return False
    wait_until(lost, 30, "the open connection to the killed primary was never lost",
               interval=0.1)
    conn.close()
    failed = 0
    start = time.monotonic()
    django = dj_database_url.parse(url)  # as a Django app reads its DATABASE_URL

    def write() -> bool:
        nonlocal failed
        try:
            with psycopg2.connect(host=django["HOST"], port=django["PORT"],
                                  dbname=django["NAME"], user=django["USER"],
                                  password=django["PASSWORD"], connect_timeout=2) as c, \
                    c.cursor() as cur:
                cur.execute("INSERT INTO orders VALUES (50) ON CONFLICT DO NOTHING")
            c.close()
            return True
        except psycopg2.Error:
            failed += 1
            return False
    wait_until(write, 60, "a write through the same DATABASE_URL after the failover",
               interval=0.2)
    window = time.monotonic() - start
    print(f"failover window {window:.2f}s, {failed} failed attempts")  # counted, shown
    new = wait_until(apps.ha.leader, 30, "a leader")
    assert new != old, "the standby leads now"
    with psycopg2.connect(url) as c, c.cursor() as cur:
        cur.execute("SELECT count(*), pg_is_in_recovery() FROM orders")
        assert cur.fetchone() == (51, False), "every acknowledged write, on the new primary"
    c.close()
    apps.ha.wait_members(2, 120)  # the old primary rejoins (Patroni rewinds it)


def test_the_same_url_answers_after_a_stop_and_start(apps: appsdb.AppsCluster) -> None:
    """`tally down` stops the cluster, Patroni, etcd and the stable address with it (the
    NAT's table goes); `tally up` starts them again and every app's URL answers as before
    (read back from the folder)."""
    url = addons.create_database(apps, "blog")
    env = {**os.environ, "TALLY_HOME": str(apps.root.parent),
           "TALLY_APPS_DB_PORTS": ",".join(map(str, apps.spec.ports)),
           "TALLY_LEDGER_PORTS": ",".join(map(str, free_ports(2)))}
    down = subprocess.run([sys.executable, "-m", "tally.cli", "down"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    ha = apps.ha
    assert [p.name for p in ha.processes() if ha.pid(p.name)] == []
    assert subprocess.run(["nft", "list", "table", "ip", dbroute.table_name(apps.proxy_port)],
                          capture_output=True).returncode != 0, "no NAT rule outlives it"
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=2).close()
    from tally.config import Config

    again = Config.from_env(env).apps_cluster()
    assert isinstance(again, appsdb.AppsCluster) and again.proxy_port == apps.proxy_port
    from tally.platform import start_addons

    start_addons(Config.from_env(env))
    conn = wait_until(lambda: _connect(url), 30, "the app's database through its old URL")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT current_database()")
        assert cur.fetchone() == ("app_blog",)
    conn.close()
    apps.ha.wait_members(2, 120)


def test_destroying_the_database_revokes_its_credentials(apps: appsdb.AppsCluster) -> None:
    url = addons.create_database(apps, "gone")
    held = psycopg2.connect(url)
    assert addons.drop_database(apps, "gone")
    with pytest.raises(psycopg2.Error), held.cursor() as cur:
        cur.execute("SELECT 1")  # its open sessions are ended
    held.close()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=3).close()
    assert not addons.drop_database(apps, "gone"), "nothing left to drop"
    again = addons.create_database(apps, "gone")
    assert again != url, "a new add-on gets new credentials"


PROBE = """
import socket, struct, sys
stable, node = int(sys.argv[1]), int(sys.argv[2])
with socket.create_connection(("127.0.0.1", stable), timeout=5) as s:
    s.sendall(struct.pack("!ii", 8, 80877103))  # PostgreSQL's SSLRequest: it answers S or N
    print("stable", s.recv(1).decode())
try:
    socket.create_connection(("127.0.0.1", node), timeout=5).close()
    print("node open")
except OSError as exc:
    print("node closed", exc.errno)
squat = socket.socket()
squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    squat.bind(("0.0.0.0", stable))
    squat.listen()
    print("squatted")
except OSError:
    print("not squatted")
"""


def test_an_app_reaches_the_primary_by_the_stable_port_and_no_node_directly(
        apps: appsdb.AppsCluster) -> None:
    """As an app's user confined by the agents' rules (its add-on: the stable port), it
    reaches PostgreSQL at the stable port (translated to the primary's port), yet that
    node port, asked for directly, is refused; nor can it take the stable port for
    itself."""
    if apps.via != "nat" or netrules.missing():
        pytest.skip("the stable address is HAProxy here (not root, or no nft)")
    assert subprocess.run(["nft", "list", "table", "ip", dbroute.table_name(apps.proxy_port)],
                          capture_output=True).returncode == 0
    uid = 2_000_000_000 + os.getpid() % 1_000_000  # no such user: a fresh uid for this test
    rules = netrules.NetRules(netrules.table_name("tally-appsdb-probe", os.getpid()))
    places = [f"127.0.0.1:{apps.proxy_port}"]
    rules.apply([netrules.Reach(uid, frozenset(netrules.addon_ports(
        places, allowed=frozenset({apps.proxy_port, *apps.spec.ports}))))])
    try:
        primary = apps.port(apps.primary())
        out = subprocess.run(["/usr/bin/python3", "-c", PROBE, str(apps.proxy_port),
                              str(primary)], user=uid, group=uid, extra_groups=[],
                             capture_output=True, text=True, timeout=60)
    finally:
        rules.remove()
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["stable N", "node closed 111", "not squatted"], \
        out.stdout
    table = subprocess.run(["nft", "list", "table", "ip", dbroute.table_name(apps.proxy_port)],
                           capture_output=True, text=True).stdout
    assert f"dnat to 127.0.0.1:{primary}" in table


def test_the_apps_cluster_runs_as_its_own_user_apart_from_the_ledgers(
        apps: appsdb.AppsCluster, cluster: Cluster) -> None:
    """Not `postgres`, the ledger cluster's user: the apps' server (whose roles are tenants')
    cannot read the ledger's files, nor the ledger's server the apps'."""
    if os.geteuid() != 0:
        pytest.skip("not root: both clusters run as whoever starts them")
    user = pwd.getpwnam(appsdb.SERVER_USER)
    assert apps.spec.os_user == appsdb.SERVER_USER != cluster.spec.os_user == "postgres"
    for node in ("a", "b"):
        assert apps.node_dir(node).stat().st_uid == user.pw_uid
        assert psutil.Process(apps.postmaster_pid(node)).uids().real == user.pw_uid
    ha = apps.ha
    assert all(psutil.Process(ha.pid(p.name)).uids().real == user.pw_uid
               for p in ha.processes() if p.user)  # etcd and Patroni; the NAT's is root's
    assert user.pw_gid != pwd.getpwnam("postgres").pw_gid
    for who, theirs in ((appsdb.SERVER_USER, cluster.node_dir(cluster.primary())),
                        ("postgres", apps.node_dir(apps.primary()))):
        read = subprocess.run(["ls", str(theirs)], user=who, group=who, extra_groups=[],
                              capture_output=True, text=True)
        assert read.returncode != 0 and "Permission denied" in read.stderr, (who, read)


def _connect(url: str) -> psycopg2.extensions.connection | None:
    try:
        return psycopg2.connect(url, connect_timeout=2)
    except psycopg2.OperationalError:
        return None
