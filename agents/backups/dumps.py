"""Apps' databases, as Heroku's `pg:backups` keeps them: a `pg_dump -Fc` of the app's
database in the apps cluster (never the ledger's), checked by reading its table of
contents back (`pg_restore --list`), and restored into the app's database as the app's own
role: objects in the dump are dropped and made again, owned by the app (privileges are
not restored: the app's role owns everything in its database; the cluster's hiding of
its neighbours, agents/addons.py, stays as it is)."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import psycopg2
from psycopg2 import sql

from agents.addons import database_name
from agents.backups.base import BackupError
from agents.backups.scratch import as_postgres, chown_tree, scratch_server
from ledger.cluster import Cluster


def _run(cluster: Cluster, tool: str, *args: str, password: str | None = None) -> None:
    env = {**os.environ, "PGPASSWORD": password or cluster.credentials()["postgres"],
           "LC_ALL": "C.UTF-8", "PGCONNECT_TIMEOUT": "5"}
    proc = subprocess.run([str(cluster.spec.bin_dir / tool), *args], capture_output=True,
                          text=True, env=env, cwd="/")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BackupError(f"{tool} failed: " + " | ".join(lines[-4:]))


def _server(cluster: Cluster, user: str = "postgres") -> list[str]:
    return ["-h", cluster.spec.host, "-p", str(cluster.port(cluster.primary())), "-U", user]


def dump(cluster: Cluster, app: str, into: Path) -> None:
    """pg_dump -Fc of the app's database into `into` (a `.partial` renamed when done)."""
    partial = into.with_suffix(".partial")
    into.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _run(cluster, "pg_dump", "-Fc", *_server(cluster), "-f", str(partial), database_name(app))
    partial.chmod(0o600)
    os.replace(partial, into)


def check(cluster: Cluster, path: Path) -> None:
    """The dump reads back whole: its table of contents lists."""
    _run(cluster, "pg_restore", "--list", str(path))


def verify_restore(cluster: Cluster, app: str, path: Path, scratch_root: Path,
                   name: str) -> int:
    """Restore the dump into a fresh scratch server (initdb, a free port, 127.0.0.1 only),
    as restore_dump does: by a role that is no superuser, in one transaction, stopping at
    the first error. A dump that does not restore is a BackupError. The tables restored."""
    bin_dir, os_user = cluster.spec.bin_dir, cluster.spec.os_user
    with scratch_server(scratch_root, name, bin_dir, os_user, "the scratch restore") as server:
        data, pwfile = server.data, server.run_dir / "pw"
        password = secrets.token_urlsafe(24)
        pwfile.write_text(password)
        pwfile.chmod(0o600)
        chown_tree(pwfile, os_user)
        made = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}",
             "-A", "scram-sha-256", "--no-sync", "-E", "UTF8", "--locale=C"],
            capture_output=True, text=True, cwd="/", env={**os.environ, "LC_ALL": "C.UTF-8"},
            **as_postgres(os_user))
        if made.returncode != 0:
            raise BackupError(f"initdb for the check failed: {made.stderr.strip()[-300:]}")
        pwfile.unlink()
        server.start()
        db, restorer = database_name(app), f"tally_restore_{secrets.token_hex(6)}"
        conn = server.connect(password, "postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(db)))
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(db), sql.Identifier(db)))
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(restorer), sql.Literal(password), sql.Identifier(db)))
        finally:
            conn.close()
        _run(cluster, "pg_restore", "-h", "127.0.0.1", "-p", str(server.port), "-U", restorer,
             "--dbname", db, "--no-owner", "--no-privileges", "--role", db,
             "--single-transaction", "--exit-on-error", str(path), password=password)
        conn = server.connect(password, db)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                            "('pg_catalog', 'information_schema')")
                return int(cur.fetchone()[0])
        finally:
            conn.close()


def restore_dump(cluster: Cluster, app: str, path: Path) -> None:
    """Into the app's database, in one transaction: what the dump holds is dropped (if
    there) and made again as the app's role, by a session that is never a superuser's."""
    name = database_name(app)
    restorer, password = f"tally_restore_{secrets.token_hex(6)}", secrets.token_urlsafe(24)
    _as_superuser(cluster, sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
        sql.Identifier(restorer), sql.Literal(password), sql.Identifier(name)))
    try:
        _run(cluster, "pg_restore", *_server(cluster, restorer), "--dbname", name, "--clean",
             "--if-exists", "--no-owner", "--no-privileges", "--role", name,
             "--single-transaction", "--exit-on-error", str(path), password=password)
    finally:
        _as_superuser(cluster, sql.SQL(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = {}")
            .format(sql.Literal(restorer)), sql.SQL("DROP ROLE IF EXISTS {}").format(
                sql.Identifier(restorer)))


def _as_superuser(cluster: Cluster, *statements: sql.Composable) -> None:
    conn = psycopg2.connect(cluster.node_dsn(cluster.primary(), "postgres", "postgres"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()
