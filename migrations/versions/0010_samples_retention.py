"""Retention of the stats samples: an index on the time of each table, so the retention
daemon (`tally serve retention --samples-older-than`) finds the old rows without scanning
a week of them (the existing indexes lead with the app).

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX instance_samples_at ON stats.instance_samples (at)")
    op.execute("CREATE INDEX router_samples_at ON stats.router_samples (at)")


def downgrade() -> None:
    op.execute("DROP INDEX stats.router_samples_at")
    op.execute("DROP INDEX stats.instance_samples_at")
