"""`tally projectors rebuild NAME`: project from position zero beside the live view, then
swap, so no reader ever sees an empty or half-built view.

1. Fresh tables `rebuild_<name>.<table>`, shaped `LIKE views.<table> INCLUDING ALL`.
2. Catch up to the head in ordinary batches (short transactions: a long writing transaction
   would hold the ledger's sequencer back).
3. One transaction: lock the projector's checkpoint row (the daemon waits), apply what came
   in meanwhile, drop the old tables, move the new ones into `views`, grant SELECT, bump
   the checkpoint's generation (the daemon reloads) and clear any error.
"""

from __future__ import annotations

from psycopg2 import sql

from ledger import Ledger
from projectors.projector import HandlerFailed, Projector
from projectors.runtime import BATCH, Runner, catch_up, connect
from projectors.store import CHECKPOINTS, copy_tables, lock_checkpoint

READERS = ("tally_reader", "tally_writer")


class RebuildFailed(RuntimeError):
    """A handler failed during the rebuild; the live view was left untouched."""


def rebuild(dsn: str, projector: Projector, batch: int = BATCH) -> int:
    """Rebuild the projector's tables; returns the position they were swapped in at."""
    schema = f"rebuild_{projector.name}"
    conn = connect(dsn, schema, f"tally-rebuild-{projector.name}")
    ledger = Ledger(dsn, notify=False, application_name=f"tally-rebuild-{projector.name}")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql.SQL("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}").format(
                sql.Identifier(schema)))
            copy_tables(cur, projector, schema)
        runner = Runner(projector, conn, checkpointed=False)
        catch_up([runner], ledger, ledger.sequence(), batch)
        _raise_if_stopped(runner)
        with conn, conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '20s'")
            lock_checkpoint(cur, projector.name)
            head = ledger.head()
            rest = ledger.read_all(after=runner.position, upto=head, limit=1_000_000)
            try:
                runner.apply_within(cur, rest, head)
            except HandlerFailed as failed:
                raise RebuildFailed(str(failed)) from failed
            _swap(cur, projector, schema)
            cur.execute(f"""UPDATE {CHECKPOINTS} SET position = %s, head = %s,
                generation = generation + 1, state = 'running', lag_events = 0,
                lag_seconds = 0, updated_at = clock_timestamp(), error_position = NULL,
                error_type = NULL, error_message = NULL, error_at = NULL WHERE name = %s""",
                        (runner.position, head, projector.name))
        return runner.position
    finally:
        ledger.close()
        conn.close()


def _raise_if_stopped(runner: Runner) -> None:
    if runner.stopped is not None:
        raise RebuildFailed(f"{runner.stopped}; the live view was left as it was")


def _swap(cur: object, projector: Projector, schema: str) -> None:
    for table in projector.tables:
        name = sql.Identifier(table)
        cur.execute(sql.SQL("DROP TABLE views.{}").format(name))  # type: ignore[attr-defined]
        cur.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA views").format(  # type: ignore
            sql.Identifier(schema), name))
        cur.execute(sql.SQL("GRANT SELECT ON views.{} TO {}").format(  # type: ignore
            name, sql.SQL(", ").join(map(sql.Identifier, READERS))))
    cur.execute(sql.SQL("DROP SCHEMA {}").format(sql.Identifier(schema)))  # type: ignore
