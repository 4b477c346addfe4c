"""Per-instance stats: requests, restarts, memory, CPU, sampled by host agents.

High-volume observations, not facts the platform decides on: a plain table, not events.
One row per running instance per sample (every 10 s): requests served since the previous
sample (gunicorn's own statsd counter; the agent's health checks are subtracted), restarts
so far, resident memory of the instance's process tree, its CPU seconds so far.

Revision ID: 0005
Revises: 0004
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE SCHEMA stats")
    op.execute(
        """
        CREATE TABLE stats.instance_samples (
            at            timestamptz NOT NULL DEFAULT now(),
            app           text NOT NULL,
            instance_id   text NOT NULL,
            host_id       text NOT NULL,
            requests      bigint NOT NULL DEFAULT 0,
            restarts      integer NOT NULL DEFAULT 0,
            memory_bytes  bigint,
            cpu_seconds   double precision
        )
        """
    )
    op.execute("CREATE INDEX instance_samples_app_at ON stats.instance_samples (app, at)")
    op.execute("GRANT USAGE ON SCHEMA stats TO tally_writer, tally_reader")
    op.execute("GRANT INSERT, SELECT ON stats.instance_samples TO tally_writer")
    op.execute("GRANT SELECT ON stats.instance_samples TO tally_reader")


def downgrade() -> None:
    op.execute("DROP SCHEMA stats CASCADE")
