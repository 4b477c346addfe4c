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
    op.execute("GRANT USAGE ON SCHEMA ledger TO tally_writer, tally_reader")
    op.execute("GRANT SELECT, INSERT ON ledger.events, ledger.positions TO tally_writer")
    op.execute("GRANT USAGE ON SEQUENCE ledger.events_id_seq TO tally_writer")
    op.execute("GRANT SELECT ON ledger.events, ledger.positions TO tally_reader")


def downgrade() -> None:
    op.execute("DROP SCHEMA ledger CASCADE")
