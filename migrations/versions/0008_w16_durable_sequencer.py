"""Positions only for events durable on the synchronous standby.

A commit whose wait for the synchronous standby is cancelled or cut (pg_cancel_backend,
a terminated session, a restarted primary) is committed on the primary alone, and visible
there. Sequenced, it would be read at a position that a failover to the standby then gives
to another event. So the sequencer places only transactions below a *durable horizon*:
it reads the xmin horizon X, then the primary's WAL flush position L (every transaction
below X has ended, its commit record at or before L), and uses X only once the synchronous
standby has flushed L. Within a few milliseconds that is the current horizon; if the
standby lags, a horizon confirmed by an earlier call of this session; if the standby is
away while one is required, nothing new gets a position. With no synchronous standby named
(synchronous_standby_names empty: the primary is alone by choice) the primary's own flush
is the durable one, as it is for acknowledgements.

`ledger.durable_lsn()` says how far the WAL is durable in that sense; `Ledger.append` uses
it too, to confirm an append whose wait ended early. It reads pg_stat_get_wal_senders(),
whose positions only members of pg_read_all_stats see: the function runs as its owner,
who must be one (`tally ledger init` and `start` grant it).

It restates most of 0001's body of `ledger.sequence` on purpose: a revision stands alone
(importing another revision's SQL would change what that one did), and its downgrade
puts 0001's function back from the same template.

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_SEQUENCE_HEAD = """
CREATE OR REPLACE FUNCTION ledger.sequence(batch integer, OUT placed bigint, OUT head bigint)
LANGUAGE plpgsql AS $$
DECLARE
    last_position bigint;
    last_tx xid8;
    last_event bigint;
"""

_SEQUENCE_BODY = """
BEGIN
    SELECT position, tx_id, event_id INTO last_position, last_tx, last_event
    FROM ledger.positions ORDER BY position DESC LIMIT 1;
    last_position := coalesce(last_position, 0);
    last_tx := coalesce(last_tx, '0'::xid8);
    last_event := coalesce(last_event, 0);
    IF NOT EXISTS (SELECT 1 FROM ledger.events e
                   WHERE e.tx_id = last_tx AND e.id > last_event)
       AND NOT EXISTS (SELECT 1 FROM ledger.events e WHERE e.tx_id > last_tx
                       AND e.tx_id < {horizon}) THEN
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
         WHERE e.tx_id > last_tx AND e.tx_id < {horizon}
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

_DURABLE_HORIZON = """
    now_xmin xid8;
    now_lsn pg_lsn;
    durable pg_lsn;
    pending_lsn pg_lsn;
    horizon xid8;
    tries integer := 0;
BEGIN
    -- The xmin horizon first, then the flush position: every transaction below the
    -- horizon has its commit record at or before that position.
    now_xmin := pg_snapshot_xmin(pg_current_snapshot());
    now_lsn := pg_current_wal_flush_lsn();
    horizon := coalesce(nullif(current_setting('tally.durable_xmin', true), ''), '0')::xid8;
    pending_lsn := nullif(current_setting('tally.pending_lsn', true), '')::pg_lsn;
    LOOP  -- a synchronous standby trails the primary's flush by a round trip
        durable := ledger.durable_lsn();
        EXIT WHEN durable >= now_lsn OR tries >= 5;
        tries := tries + 1;
        PERFORM pg_sleep(0.001);
    END LOOP;
    IF durable >= now_lsn THEN
        horizon := greatest(horizon, now_xmin);
        PERFORM set_config('tally.pending_lsn', '', false);
    ELSE
        IF durable >= pending_lsn THEN  -- an earlier call's horizon is durable by now
            horizon := greatest(horizon,
                                current_setting('tally.pending_xmin', true)::xid8);
            pending_lsn := NULL;
        END IF;
        IF pending_lsn IS NULL THEN
            PERFORM set_config('tally.pending_xmin', now_xmin::text, false);
            PERFORM set_config('tally.pending_lsn', now_lsn::text, false);
        END IF;
    END IF;
    PERFORM set_config('tally.durable_xmin', horizon::text, false);
    SELECT s.placed, s.head INTO placed, head FROM ledger.sequence_below(batch, horizon) s;
END
$$
"""


def upgrade() -> None:
    op.execute(
        """
        DO $$ BEGIN
            IF NOT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') THEN
                RAISE EXCEPTION '% must be a member of pg_read_all_stats to read the '
                    'standby''s position: GRANT pg_read_all_stats TO % (tally ledger '
                    'start does it)', current_user, current_user;
            END IF;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION ledger.durable_lsn() RETURNS pg_lsn
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
            SELECT CASE WHEN current_setting('synchronous_standby_names') = ''
                        THEN pg_current_wal_flush_lsn()
                        ELSE (SELECT max(flush_lsn) FROM pg_stat_get_wal_senders()
                              WHERE sync_state IN ('sync', 'quorum')) END
        $$
        """
    )
    op.execute("REVOKE EXECUTE ON FUNCTION ledger.durable_lsn() FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION ledger.durable_lsn() TO tally_writer")
    # The placing itself, below a horizon given by the caller (ledger.sequence).
    op.execute(
        _SEQUENCE_HEAD.replace("ledger.sequence(batch integer,",
                               "ledger.sequence_below(batch integer, horizon xid8,")
        + _SEQUENCE_BODY.format(horizon="horizon"))
    # Writers may insert positions anyway; what keeps them right is calling sequence().
    op.execute("REVOKE EXECUTE ON FUNCTION ledger.sequence_below(integer, xid8) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION ledger.sequence_below(integer, xid8) TO tally_writer")
    op.execute(_SEQUENCE_HEAD + _DURABLE_HORIZON)


def downgrade() -> None:
    op.execute(_SEQUENCE_HEAD + _SEQUENCE_BODY.format(
        horizon="pg_snapshot_xmin(pg_current_snapshot())"))
    op.execute("DROP FUNCTION ledger.sequence_below(integer, xid8)")
    op.execute("DROP FUNCTION ledger.durable_lsn()")
