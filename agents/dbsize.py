"""Add-on databases held to their size: no app fills the apps' cluster's disk.

Every app's PostgreSQL add-on shares one cluster and its disk (and its host's, the
ledger's under `tally up`). Each round (`tally serve addons`) the watcher reads every app
database's size and holds it to its app's `database_mb` quota (api/quotas.py; the smaller
of the app's and its owner's), as Heroku's Postgres plans do:

- past the limit, the database is made **read-only**: `default_transaction_read_only` set
  on it and every session on it ended, so the app's next write fails with "cannot execute
  INSERT in a read-only transaction" and its reads go on. Its owner may free space (in a
  session: `SET default_transaction_read_only = off`, then DELETE, TRUNCATE, VACUUM FULL);
- past HARD times the limit (a tenant that turned read-only off and wrote on), it is
  **refused**: CONNECT is revoked from every role that had it (the owner may have let its
  tenant's other apps' roles in) and every session ended ("permission denied for database
  ... User does not have CONNECT privilege"); a grant found later counts as open and is
  taken back. The role owns its database but can connect to no other
  (agents/addons.py), so it cannot grant itself back in;
- back under its limit (an admin raised the quota, the owner deleted rows), it is let be.

Every change is logged by the daemon with the size and the limit, and written in the
app's own log as the platform's line (`tally logs`: `tally[<app>.addon.postgresql] Error
D18 (Database size quota exceeded): ...`, agents/notices.py). A query's temporary
files (a sort that spills) are no table: `temp_file_limit` (which only a superuser may
change) bounds them per session. What the round's period lets through between two looks
is written before the watcher acts: the limit bounds a database to its size plus what an
app can write in one period.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

log = logging.getLogger("tally.addons")
MiB = 2**20
HARD = 1.25
"""Past this many times its limit, a database is refused, not only read-only."""
TEMP_FILE_LIMIT = "1GB"
"""A session's temporary files at most (sorts and hashes that spill to disk)."""
OK, READ_ONLY, REFUSED = "ok", "read-only", "refused"


def state_for(size: int, limit_mb: int) -> str:
    """What a database of `size` bytes should be under a limit of `limit_mb` MiB."""
    if size > limit_mb * MiB * HARD:
        return REFUSED
    return READ_ONLY if size > limit_mb * MiB else OK


def app_of(database: str) -> str | None:
    """The app whose add-on database this is (agents/addons.py: database_name), if any;
    app names hold no `_`, so the mapping goes back."""
    return database[4:].replace("_", "-") if database.startswith("app_") else None


@dataclass(frozen=True)
class Change:
    database: str
    size: int
    limit_mb: int
    before: str
    after: str

    def message(self) -> str:
        size = f"{self.size / MiB:.0f} MiB of its {self.limit_mb} MiB database_mb quota"
        return {READ_ONLY: f"{self.database} is read-only: it holds {size} (delete or "
                           "truncate to go on writing; an admin may raise the quota)",
                REFUSED: f"{self.database} refuses connections: it holds {size}, past "
                         f"{HARD:g} times the limit (an admin may raise the quota)",
                OK: f"{self.database} is writable again: it holds {size}"}[self.after]

    def notice(self) -> str:
        """The line for the app's log (agents/notices.py): an error code as the agents'
        R14/R15 lines have (tally's own; Heroku has none for this)."""
        if self.after == OK:
            return self.message()
        return f"Error D18 (Database size quota exceeded): {self.message()}"


def plan(sizes: dict[str, int], states: dict[str, str],
         limit_of: Callable[[str], int]) -> list[Change]:
    """The databases whose state must change (pure)."""
    out = []
    for database, size in sorted(sizes.items()):
        app = app_of(database)
        if app is None:
            continue
        limit = limit_of(app)
        want, now = state_for(size, limit), states.get(database, OK)
        if want != now:
            out.append(Change(database, size, limit, now, want))
    return out


def read(conn: Any) -> tuple[dict[str, int], dict[str, str]]:
    """(size in bytes, state) of every app database in the cluster."""
    with conn.cursor() as cur:
        cur.execute(r"""
            SELECT d.datname, pg_database_size(d.oid),
                   has_database_privilege(d.datname, d.oid, 'CONNECT') OR EXISTS (
                       SELECT 1 FROM aclexplode(d.datacl) a
                       WHERE a.privilege_type = 'CONNECT' AND a.grantee NOT IN (
                           SELECT oid FROM pg_roles WHERE rolsuper)),
                   EXISTS (SELECT 1 FROM pg_db_role_setting s
                           WHERE s.setdatabase = d.oid AND s.setrole = 0
                           AND 'default_transaction_read_only=on' = ANY (s.setconfig))
            FROM pg_database d JOIN pg_roles r ON r.rolname = d.datname
            WHERE d.datname LIKE 'app\_%'""")
        rows = cur.fetchall()
    sizes = {name: size for name, size, _, _ in rows}
    states = {name: REFUSED if not connect else READ_ONLY if read_only else OK
              for name, _, connect, read_only in rows}
    return sizes, states


def apply(conn: Any, change: Change) -> None:
    """Put one database in its new state (as the cluster's superuser, autocommit)."""
    ident = sql.Identifier(change.database)
    with conn.cursor() as cur:
        if change.after == REFUSED:  # from every role: the owner may have let others in
            cur.execute("""SELECT r.rolname FROM pg_database d, aclexplode(d.datacl) a
                           JOIN pg_roles r ON r.oid = a.grantee
                           WHERE d.datname = %s AND a.privilege_type = 'CONNECT'
                           AND NOT r.rolsuper""", (change.database,))
            let_in = sorted({change.database, *(name for (name,) in cur.fetchall())})
            cur.execute(sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC, {}").format(
                ident, sql.SQL(", ").join(map(sql.Identifier, let_in))))
        else:
            cur.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(ident, ident))
        if change.after == OK:
            cur.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only")
                        .format(ident))
        else:
            cur.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on")
                        .format(ident))
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (change.database,))  # every role's sessions, not only the owner's


def bound_temp_files(conn: Any, databases: Iterable[str]) -> None:
    """Every app role's temporary files per session at most TEMP_FILE_LIMIT (set only
    where missing: a catalog write per round would be a waste)."""
    with conn.cursor() as cur:
        for database in databases:
            cur.execute("SELECT 1 FROM pg_db_role_setting s JOIN pg_roles r "
                        "ON r.oid = s.setrole WHERE r.rolname = %s AND s.setdatabase = 0 "
                        "AND %s = ANY (s.setconfig)",
                        (database, f"temp_file_limit={TEMP_FILE_LIMIT}"))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("ALTER ROLE {} SET temp_file_limit = %s")
                            .format(sql.Identifier(database)), (TEMP_FILE_LIMIT,))


class Watcher:
    """One round: read sizes, change what must change, log each change."""

    def __init__(self, connect: Callable[[], Any], limit_of: Callable[[str], int],
                 say: Callable[[str, str], object] | None = None) -> None:
        self.connect, self.limit_of, self.say = connect, limit_of, say
        """`say(app, line)`: the change in the app's own log (agents/notices.py)."""

    def tick(self) -> list[Change]:
        conn = self.connect()
        try:
            sizes, states = read(conn)
            bound_temp_files(conn, sizes)
            changes = plan(sizes, states, self.limit_of)
            for change in changes:
                apply(conn, change)
                log.warning("%s", change.message())
                if self.say is not None and (app := app_of(change.database)):
                    self.say(app, change.notice())
        finally:
            conn.close()
        return changes
