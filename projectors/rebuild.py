"""`tally projectors rebuild NAME`: project from position zero beside the live views, then
swap, so no reader ever sees an empty or half-built view.

1. Fresh tables `rebuild_<name>.<table>`, shaped `LIKE views.<table> INCLUDING ALL`.
2. Catch up to the head, rows kept in memory and written every FLUSH_EVERY events (short
   transactions: a long writing transaction would hold the ledger's sequencer back; and
   heartbeats of a host collapse into one row write).
3. One transaction: lock the projectors' checkpoint rows (the daemon waits), apply what
   came in meanwhile, drop the old tables, move the new ones into `views`, grant SELECT,
   bump each checkpoint's generation (the daemon reloads) and clear any error.

Several projectors rebuild in one pass over the ledger (`rebuild(dsn, projectors.ALL)`).
Index names of swapped tables are PostgreSQL's defaults (`releases_app_idx`), not the
migration's: later migrations should refer to indexes by IF EXISTS or recreate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg2 import sql

from ledger import Ledger
from projectors.projector import HandlerFailed, Projector
from projectors.runtime import BATCH, FLUSH_EVERY, Runner, catch_up, connect
from projectors.store import CHECKPOINTS, copy_tables, lock_checkpoint

READERS = ("tally_reader", "tally_writer")


class RebuildFailed(RuntimeError):
    """A handler failed during the rebuild; the live views were left untouched."""


def rebuild(dsn: str, projectors: Sequence[Projector], batch: int = BATCH) -> int:
    """Rebuild the projectors' tables; returns the position they were swapped in at."""
    conn = connect(dsn, "views", "tally-rebuild")
    ledger = Ledger(dsn, notify=False, application_name="tally-rebuild")
    try:
        runners = []
        for projector in sorted(projectors, key=lambda p: p.name):
            schema = _schema(projector)
            with conn, conn.cursor() as cur:
                cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}")
                            .format(sql.Identifier(schema)))
                copy_tables(cur, projector, schema)
            runners.append(_BesideRunner(projector, conn, schema))
        catch_up(runners, ledger, ledger.sequence(), batch)
        for runner in runners:
            if runner.stopped is not None:
                raise RebuildFailed(f"{runner.stopped}; the live views were left as they were")
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '20s'")
            for runner in runners:
                lock_checkpoint(cur, runner.name, create=True)
            head = ledger.head()
            rest = ledger.read_batch(min(r.position for r in runners), head)
            for runner in runners:
                _finish(cur, runner, rest, head)
        return head
    finally:
        ledger.close()
        conn.close()


def _schema(projector: Projector) -> str:
    return f"rebuild_{projector.name}"


class _BesideRunner(Runner):
    """A runner writing into its own rebuild schema (the connection is shared)."""

    def __init__(self, projector: Projector, conn: Any, schema: str) -> None:
        super().__init__(projector, conn, checkpointed=False, flush_every=FLUSH_EVERY)
        self.schema = schema

    def flush(self) -> None:
        with self.conn, self.conn.cursor() as cur:
            _search_path(cur, self.schema)
            self.writer.write(cur, self.tables)
        self.pending = 0


def _search_path(cur: Any, schema: str) -> None:
    cur.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))


def _finish(cur: Any, runner: Runner, rest: Sequence[Any], head: int) -> None:
    """Inside the swap transaction: last events, then move the tables into views."""
    schema = _schema(runner.projector)
    _search_path(cur, schema)
    try:
        runner.apply_within(cur, [e for e in rest if e.position > runner.position], head)
    except HandlerFailed as failed:
        raise RebuildFailed(f"{failed}; the live views were left as they were") from failed
    runner.writer.write(cur, runner.tables)
    for table in runner.projector.tables:
        name = sql.Identifier(table)
        cur.execute(sql.SQL("DROP TABLE views.{}").format(name))
        cur.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA views").format(
            sql.Identifier(schema), name))
        cur.execute(sql.SQL("GRANT SELECT ON views.{} TO {}").format(
            name, sql.SQL(", ").join(map(sql.Identifier, READERS))))
    cur.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(schema)))
    cur.execute("SET LOCAL search_path = views")
    cur.execute(f"""UPDATE {CHECKPOINTS} SET position = %s, head = %s,
        generation = generation + 1, state = 'running', lag_events = 0, lag_seconds = 0,
        updated_at = clock_timestamp(), error_position = NULL, error_type = NULL,
        error_message = NULL, error_at = NULL WHERE name = %s""",
                (head, head, runner.name))
