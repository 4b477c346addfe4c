"""API: no tables. Users, roles, API tokens (sha256 hashes only), app memberships and
domain claims are events in the ledger (catalogue: UserCreated, TokenIssued, TokenRevoked,
AppMemberAdded/Removed, DomainClaimed/Released); the API folds them in memory
(api/auth.py, api/services.py). This revision keeps the numbering the parts agreed on.

Revision ID: 0003
Revises: 0002
"""

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to create: every fact the API keeps is an event."""


def downgrade() -> None:
    """Nothing to drop."""
