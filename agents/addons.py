"""The PostgreSQL add-on: a database and a role per app in the platform's *apps* cluster (a
primary and a synchronous standby of their own, never the ledger's: apps' write traffic
must not stall ledger readers).

The role owns its database and nothing else; PUBLIC may connect to no database of the
cluster (the apps', `postgres`, `template1`, the cluster's own), so one app's credentials
open no other app's data; in its database the catalogs that list the cluster's databases,
roles and sessions are closed to it (HIDDEN). What PostgreSQL still shows any role: that
a database or role name exists (an error naming it differs from "does not exist", e.g.
has_database_privilege), its own database's catalogs, and the server's version.

The result is the DATABASE_URL the app receives as a config var: a standard single-host URL
(`postgres://user:password@host:port/db`) naming the cluster's stable address, which follows
the primary (agents/appsdb.py), so dj-database-url, SQLAlchemy and psycopg take it as is.
Destroying the add-on drops the database (its connections ended first) and the role, so
its credentials open nothing afterwards.
"""

from __future__ import annotations

import fcntl
import secrets
import time
from typing import Any
from urllib.parse import quote

import psycopg2
from psycopg2 import sql

from agents.appsdb import address, ensure_server_user
from ledger.cluster import Cluster


class AddonError(Exception):
    """The add-on could not be created; the message says why."""


def ensure_cluster(cluster: Cluster) -> None:
    """Create the apps cluster on first use, and start it. Under a file lock: two API
    workers asked for add-ons at once must not both run initdb in one folder."""
    lock = cluster.root.with_name(cluster.root.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not cluster.initialized():
            ensure_server_user(cluster.spec.os_user)
            cluster.init()
        cluster.start()


def database_name(app: str) -> str:
    return "app_" + app.replace("-", "_")


HIDDEN = ("pg_database", "pg_roles", "pg_user", "pg_group", "pg_auth_members",
          "pg_stat_activity", "pg_stat_database", "pg_stat_database_conflicts",
          "pg_shdescription", "pg_db_role_setting", "pg_stat_ssl", "pg_stat_gssapi",
          "pg_replication_origin_status", "pg_stat_replication", "pg_stat_wal_receiver",
          "pg_stat_subscription", "pg_shseclabel", "pg_seclabels", "pg_tablespace")
"""Catalogs and views that list the whole cluster's databases, roles and sessions: not
for an app's role to read from its database (it keeps its own schema's catalogs)."""
HIDDEN_FUNCTIONS = ("pg_stat_get_activity(integer)", "pg_stat_get_backend_userid(integer)",
                    "pg_stat_get_backend_dbid(integer)", "pg_stat_get_db_numbackends(oid)")
"""The functions under pg_stat_activity and pg_stat_database."""


def _hide_the_neighbours(cluster: Cluster, database: str) -> None:
    """In the app's database, PUBLIC may no longer read who else the cluster serves."""
    conn = psycopg2.connect(cluster.node_dsn(cluster.primary(), "postgres", database))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            # A tenant may have made its own database read-only by default (as the size
            # watcher does past its quota): these REVOKEs must not fail on that database,
            # which would refuse every other app's new add-on.
            cur.execute("SET default_transaction_read_only = off")
            for name in HIDDEN:
                cur.execute(sql.SQL("REVOKE ALL ON pg_catalog.{} FROM PUBLIC")
                            .format(sql.Identifier(name)))
            for fn in HIDDEN_FUNCTIONS:
                cur.execute(f"REVOKE EXECUTE ON FUNCTION pg_catalog.{fn} FROM PUBLIC")
    finally:
        conn.close()


def create_database(cluster: Cluster, app: str) -> str:
    """Create the app's role and database (refused if they exist); return DATABASE_URL."""
    name = database_name(app)
    password = secrets.token_urlsafe(24)
    conn = superuser(cluster)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s UNION ALL "
                        "SELECT 1 FROM pg_database WHERE datname = %s", (name, name))
            if cur.fetchone():
                raise AddonError(f"{app} already has a postgresql database ({name})")
            ident = sql.Identifier(name)
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s CONNECTION LIMIT 50")
                        .format(ident), (password,))
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(ident, ident))
            cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
            cur.execute("SELECT datname FROM pg_database WHERE NOT datistemplate OR "
                        "datname = 'template1'")
            for (other,) in cur.fetchall():  # postgres, template1, the cluster's own
                if not other.startswith("app_"):
                    cur.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC")
                                .format(sql.Identifier(other)))
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'app\\_%'")
            apps = [row[0] for row in cur.fetchall()]
    finally:
        conn.close()
    for database in apps:  # this one, and any made before the catalogs were closed
        _hide_the_neighbours(cluster, database)
    host, port = address(cluster)
    url = f"postgresql://{name}:{quote(password, safe='')}@{host}:{port}/{name}"
    _wait_writable(url)
    return url


def _wait_writable(url: str, timeout: float = 30.0) -> None:
    """Until the URL reaches the primary: a proxy just started (or restarted) may not have
    checked its nodes yet, and the app's first write must not meet a standby."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = psycopg2.connect(url, connect_timeout=3)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_is_in_recovery()")
                    if cur.fetchone() == (False,):
                        return
            finally:
                conn.close()
        except psycopg2.OperationalError:
            pass
        if time.monotonic() > deadline:
            raise AddonError(f"{url.rsplit('@', 1)[1]} did not reach the primary within "
                             f"{timeout:.0f}s")
        time.sleep(0.1)


def drop_database(cluster: Cluster, app: str) -> bool:
    """Drop the app's database (ending its sessions) and its role: its credentials open
    nothing afterwards. Idempotent; True if there was something to drop."""
    name = database_name(app)
    conn = superuser(cluster)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s UNION ALL "
                        "SELECT 1 FROM pg_database WHERE datname = %s", (name, name))
            found = cur.fetchone() is not None
            ident = sql.Identifier(name)
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            if cur.fetchone():  # no new session, then none left
                cur.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(ident))
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
    finally:
        conn.close()
    return found


def superuser(cluster: Cluster) -> Any:
    """A connection to the primary's `postgres` database as the cluster's superuser
    (autocommit)."""
    conn = psycopg2.connect(cluster.node_dsn(cluster.primary(), "postgres", "postgres"))
    conn.autocommit = True
    return conn
