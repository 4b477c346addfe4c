"""The ledger: events, their positions in the one total order, and role grants.

Writers insert events with the id of their transaction (`tx_id`). A sequencer (see
ledger/store.py) later gives each committed event a dense global `position`, in
(tx_id, id) order, only once every transaction with a smaller id has ended. So positions
never skip a late commit, and readers need nothing but `position > checkpoint`.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SCHEMA ledger")
    op.execute(
        """
        CREATE TABLE ledger.events (
            id              bigserial PRIMARY KEY,
            tx_id           xid8 NOT NULL DEFAULT pg_current_xact_id(),
            stream          text NOT NULL,
            category        text NOT NULL,
            version         integer NOT NULL CHECK (version > 0),
            type            text NOT NULL,
            data            jsonb NOT NULL,
            metadata        jsonb NOT NULL DEFAULT '{}',
            recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
            idempotency_key text,
            CONSTRAINT events_stream_version UNIQUE (stream, version)
        )
        """
    )
    op.execute("CREATE INDEX events_tx_order ON ledger.events (tx_id, id)")
    op.execute(
        "CREATE UNIQUE INDEX events_idempotency_key ON ledger.events (idempotency_key) "
        "WHERE idempotency_key IS NOT NULL"
    )
    op.execute(
        """
        CREATE TABLE ledger.positions (
            position  bigint PRIMARY KEY,
            event_id  bigint NOT NULL,
            tx_id     xid8 NOT NULL,
            CONSTRAINT positions_event UNIQUE (event_id)
        )
        """
    )
    # The sequencer, in one round trip. Each statement of a plpgsql function takes a fresh
    # snapshot, so the INSERT sees every position committed before the lock was granted.
    # Positions are derived data: (tx_id, id) order below the xmin horizon fixes them, so a
    # batch lost with an asynchronous commit is given the very same positions again. Hence
    # synchronous_commit off: the sequencer never waits for the standby.
    op.execute(
        """
        CREATE FUNCTION ledger.sequence(batch integer, OUT placed bigint, OUT head bigint)
        LANGUAGE plpgsql AS $$
        DECLARE
            last_position bigint;
            last_tx xid8;
            last_event bigint;
        BEGIN
            -- "After the cursor" is written as two index ranges, never as a row
            -- comparison (tx_id, id) > (..): with plpgsql variables the planner turns that
            -- into a full scan (measured: 8 ms instead of 0.02 ms a call).
            SELECT position, tx_id, event_id INTO last_position, last_tx, last_event
            FROM ledger.positions ORDER BY position DESC LIMIT 1;
            last_position := coalesce(last_position, 0);
            last_tx := coalesce(last_tx, '0'::xid8);
            last_event := coalesce(last_event, 0);
            -- Nothing to do is the common case of a hot relay's poll: answer it lock-free.
            IF NOT EXISTS (SELECT 1 FROM ledger.events e
                           WHERE e.tx_id = last_tx AND e.id > last_event)
               AND NOT EXISTS (SELECT 1 FROM ledger.events e WHERE e.tx_id > last_tx
                               AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())) THEN
                placed := 0;
                head := last_position;
                RETURN;
            END IF;
            SET LOCAL synchronous_commit = off;
            PERFORM pg_advisory_xact_lock(500152823929);
            SELECT position, tx_id, event_id INTO last_position, last_tx, last_event
            FROM ledger.positions ORDER BY position DESC LIMIT 1;
            last_position := coalesce(last_position, 0);
            last_tx := coalesce(last_tx, '0'::xid8);
            last_event := coalesce(last_event, 0);
            WITH todo AS (
                (SELECT e.id, e.tx_id FROM ledger.events e
                 WHERE e.tx_id = last_tx AND e.id > last_event
                 ORDER BY e.id LIMIT batch)
                UNION ALL
                (SELECT e.id, e.tx_id FROM ledger.events e
                 WHERE e.tx_id > last_tx
                   AND e.tx_id < pg_snapshot_xmin(pg_current_snapshot())
                 ORDER BY e.tx_id, e.id LIMIT batch)
                LIMIT batch
            ), ins AS (
                INSERT INTO ledger.positions (position, event_id, tx_id)
                SELECT last_position + row_number() OVER (ORDER BY tx_id, id), id, tx_id
                FROM todo
                RETURNING position
            )
            SELECT count(*) INTO placed FROM ins;
            head := last_position + placed;
        END
        $$
        """
    )
    op.execute("GRANT USAGE ON SCHEMA ledger TO tally_writer, tally_reader")
    op.execute("GRANT SELECT, INSERT ON ledger.events, ledger.positions TO tally_writer")
    op.execute("GRANT USAGE ON SEQUENCE ledger.events_id_seq TO tally_writer")
    op.execute("GRANT SELECT ON ledger.events, ledger.positions TO tally_reader")
    op.execute("GRANT EXECUTE ON FUNCTION ledger.sequence(integer) TO tally_writer")
    op.execute("REVOKE EXECUTE ON FUNCTION ledger.sequence(integer) FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP SCHEMA ledger CASCADE")
