"""Apps' databases, as Heroku's `pg:backups` keeps them: a `pg_dump -Fc` of the app's
database in the apps cluster (never the ledger's), checked by reading its table of
contents back (`pg_restore --list`), and restored into the app's database as the app's own
role: objects in the dump are dropped and made again, owned by the app (privileges are
not restored: the app's role owns everything in its database; the cluster's hiding of
its neighbours, agents/addons.py, stays as it is)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agents.addons import database_name
from agents.backups.base import BackupError
from ledger.cluster import Cluster


def _run(cluster: Cluster, tool: str, *args: str) -> None:
    env = {**os.environ, "PGPASSWORD": cluster.credentials()["postgres"], "LC_ALL": "C.UTF-8",
           "PGCONNECT_TIMEOUT": "5"}
    proc = subprocess.run([str(cluster.spec.bin_dir / tool), *args], capture_output=True,
                          text=True, env=env, cwd="/")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise BackupError(f"{tool} failed: " + " | ".join(lines[-4:]))


def _server(cluster: Cluster) -> list[str]:
    return ["-h", cluster.spec.host, "-p", str(cluster.port(cluster.primary())),
            "-U", "postgres"]


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


def restore_dump(cluster: Cluster, app: str, path: Path) -> None:
    """Into the app's database, in one transaction: what the dump holds is dropped (if
    there) and made again as the app's role."""
    name = database_name(app)
    _run(cluster, "pg_restore", *_server(cluster), "--dbname", name, "--clean",
         "--if-exists", "--no-owner", "--no-privileges", "--role", name,
         "--single-transaction", "--exit-on-error", str(path))
