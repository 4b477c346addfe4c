"""The PostgreSQL add-on: a database and a role per app in the platform's *apps* cluster (a
primary and a synchronous standby of their own, never the ledger's: apps' write traffic
must not stall ledger readers).

The role owns its database and nothing else; PUBLIC may not connect to it, so one app's
credentials open no other app's data. The result is the DATABASE_URL the app receives as a
config var (a multi-host URL: libpq finds the primary after a failover).
"""

from __future__ import annotations

import secrets
from urllib.parse import quote

import psycopg2
from psycopg2 import sql

from ledger.cluster import Cluster


class AddonError(Exception):
    """The add-on could not be created; the message says why."""


def ensure_cluster(cluster: Cluster) -> None:
    """Create the apps cluster on first use, and start it."""
    if not cluster.initialized():
        cluster.init()
    cluster.start()


def database_name(app: str) -> str:
    return "app_" + app.replace("-", "_")


def create_database(cluster: Cluster, app: str) -> str:
    """Create the app's role and database (refused if they exist); return DATABASE_URL."""
    name = database_name(app)
    password = secrets.token_urlsafe(24)
    conn = psycopg2.connect(cluster.node_dsn(cluster.primary(), "postgres", "postgres"))
    conn.autocommit = True
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
    finally:
        conn.close()
    hosts = ",".join(f"{cluster.spec.host}:{p}" for p in cluster.spec.ports)
    return (f"postgresql://{name}:{quote(password, safe='')}@{hosts}/{name}"
            "?target_session_attrs=read-write")
