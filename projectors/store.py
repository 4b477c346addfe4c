"""The SQL shell under the projectors: load a projector's rows, write what a batch changed,
keep its checkpoint. Table names are unqualified: the connection's search_path says where
they live (`views` live, `rebuild_<name>` beside, `pg_temp` for a replay), so the one
code path serves all three, and the DDL stays in migrations/ (scratch tables are made
`LIKE views.<table> INCLUDING ALL`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2 import sql
from psycopg2.extras import Json, RealDictCursor, execute_values

from projectors.projector import Projector
from projectors.tables import Row, Tables

CHECKPOINTS = "views.projector_checkpoints"
PAGE = 2000
PROJECTED = "tally_projected"
"""NOTIFY channel: the projectors daemon committed checkpoints (payload: the position the
batch reached). Readers that wait for a position (the API's routing table for balancers)
are woken by it instead of polling the checkpoints."""


def set_schema(conn: Any, schema: str) -> None:
    """Point the session's unqualified table names at `schema`."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
    conn.commit()


def copy_tables(cur: Any, projector: Projector, schema: str, temporary: bool = False) -> None:
    """Empty tables shaped like the projector's views, in `schema` (or temporary)."""
    for table in projector.tables:
        target = (sql.SQL("TEMPORARY TABLE {}").format(sql.Identifier(table)) if temporary
                  else sql.SQL("TABLE {}.{}").format(sql.Identifier(schema),
                                                     sql.Identifier(table)))
        cur.execute(sql.SQL("CREATE {} (LIKE views.{} INCLUDING ALL)").format(
            target, sql.Identifier(table)))


def load_tables(cur: Any, projector: Projector) -> Tables:
    tables = projector.new_tables()
    for table in projector.tables:
        tables.load(table, read_rows(cur, table, projector.tables[table]))
    return tables


def read_rows(cur: Any, table: str, key: tuple[str, ...]) -> list[Row]:
    """Every row of a table (unqualified name), ordered by its key."""
    with cur.connection.cursor(cursor_factory=RealDictCursor) as dict_cur:
        dict_cur.execute(sql.SQL("SELECT * FROM {} ORDER BY {}").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, key))))
        return [dict(r) for r in dict_cur.fetchall()]


class Writer:
    """Writes the changes of a Tables, remembering which columns are jsonb."""

    def __init__(self) -> None:
        self._jsonb: dict[str, frozenset[str]] = {}

    def jsonb_columns(self, cur: Any, table: str) -> frozenset[str]:
        if table not in self._jsonb:
            cur.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                        "AND attnum > 0 AND NOT attisdropped AND atttypid = 'jsonb'::regtype",
                        (table,))
            self._jsonb[table] = frozenset(r[0] for r in cur.fetchall())
        return self._jsonb[table]

    def write(self, cur: Any, tables: Tables) -> int:
        """Apply what changed since the last write; returns the number of rows written."""
        written = 0
        for table, changes in tables.take_changes().items():
            key = tables.keys[table]
            deletes = [k for k, row in changes.items() if row is None]
            if deletes:
                execute_values(cur, sql.SQL("DELETE FROM {} WHERE ({}) IN (VALUES %s)").format(
                    sql.Identifier(table), _names(key)).as_string(cur), deletes, page_size=PAGE)
            groups: dict[tuple[str, ...], list[Row]] = {}
            for row in changes.values():
                if row is not None:
                    groups.setdefault(tuple(sorted(row)), []).append(row)
            jsonb = self.jsonb_columns(cur, table)
            for columns, rows in groups.items():
                values = [tuple(Json(r[c]) if c in jsonb else r[c] for c in columns)
                          for r in rows]
                execute_values(cur, _upsert(table, columns, key).as_string(cur), values,
                               page_size=PAGE)
            written += len(changes)
        return written


def _names(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, columns))


def _upsert(table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> sql.Composable:
    rest = [c for c in columns if c not in key]
    action = (sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest))
        if rest else sql.SQL("DO NOTHING"))
    return sql.SQL("INSERT INTO {} ({}) VALUES %s ON CONFLICT ({}) {}").format(
        sql.Identifier(table), _names(columns), _names(key), action)


# -- checkpoints -------------------------------------------------------------------------


def lock_checkpoint(cur: Any, name: str, *, create: bool = False
                    ) -> tuple[int, int, str, int | None]:
    """Lock the projector's checkpoint row for this transaction (made if missing and
    `create`): (position, generation, state, error_position)."""
    if create:
        cur.execute(f"INSERT INTO {CHECKPOINTS} (name) VALUES (%s) ON CONFLICT DO NOTHING",
                    (name,))
    cur.execute(f"SELECT position, generation, state, error_position FROM {CHECKPOINTS} "
                "WHERE name = %s FOR UPDATE", (name,))
    return cur.fetchone()


def lock_checkpoints(cur: Any, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Lock several checkpoint rows at once (in name order, as every locker does):
    name -> (position, generation)."""
    cur.execute(f"SELECT name, position, generation FROM {CHECKPOINTS} WHERE name = ANY(%s) "
                "ORDER BY name FOR UPDATE", (list(names),))
    return {name: (position, generation) for name, position, generation in cur.fetchall()}


def save_checkpoints(cur: Any, done: Sequence[tuple[str, int, Any]], head: int,
                     notify: bool = False) -> None:
    """Record (name, position, recorded_at of that event) and the lag, in the batch's
    transaction; clears any error. `notify`: also tell listeners (PROJECTED, with the
    highest position saved) when the transaction commits, in the same round trip."""
    if not done:
        return
    update = f"""UPDATE {CHECKPOINTS} c SET position = v.p,
        head = greatest(v.h, v.p), lag_events = greatest(v.h - v.p, 0),
        lag_seconds = CASE WHEN v.h > v.p THEN extract(epoch FROM clock_timestamp() - v.at)
                      ELSE 0 END,
        state = 'running', updated_at = clock_timestamp(),
        error_position = NULL, error_type = NULL, error_message = NULL, error_at = NULL
        FROM (VALUES %s) AS v(n, p, h, at) WHERE c.name = v.n"""
    if notify:  # a data-modifying WITH runs whether or not the query reads it
        reached = int(max(p for _, p, _ in done))
        update = (f"WITH saved AS ({update} RETURNING 1) "
                  f"SELECT pg_notify('{PROJECTED}', '{reached}')")
    execute_values(cur, update, [(name, position, head, at) for name, position, at in done],
                   template="(%s, %s::bigint, %s::bigint, %s::timestamptz)",
                   page_size=max(PAGE, len(done)))


def save_error(cur: Any, name: str, position: int, event_type: str, message: str) -> None:
    cur.execute(
        f"""UPDATE {CHECKPOINTS} SET state = 'stopped', error_position = %s, error_type = %s,
            error_message = %s, error_at = clock_timestamp(), updated_at = clock_timestamp()
            WHERE name = %s""", (position, event_type, message[:2000], name))
