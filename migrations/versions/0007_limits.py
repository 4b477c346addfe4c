"""Why an instance last exited, when its host knows better than the exit code: `R15 ...`
when the kernel killed it at its memory limit (agents/cgroups.py). Shown by `tally ps`.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE views.instances ADD COLUMN reason text NOT NULL DEFAULT ''")


def downgrade() -> None:
    op.execute("ALTER TABLE views.instances DROP COLUMN reason")
