"""Views: rollouts. The placer deploys a release gradually and reports the outcome
(ReleaseDeployed / ReleaseFailed); the views now say which release is deployed, which
failed and why, so the API, `why` and the balancers agree with the placer.

apps.deployed_release      the last release whose rollout completed (ReleaseDeployed);
                           `current_release` stays the newest one asked for (the target).
apps.deployed_position     where that was recorded.
releases.status            now pending (rolling out) | deployed | failed | superseded.
releases.failure_reason    why it failed (ReleaseFailed), else NULL.
releases.status_position   the event that set the status.
route_apps.deployed_release, route_apps.failed_releases
                           the routes projector's own copy (routes send traffic to the target
                           release unless it failed, and to the deployed one meanwhile).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE views.apps ADD COLUMN deployed_release integer, "
               "ADD COLUMN deployed_position bigint")
    op.execute("ALTER TABLE views.releases ADD COLUMN failure_reason text, "
               "ADD COLUMN status_position bigint")
    op.execute("ALTER TABLE views.route_apps ADD COLUMN deployed_release integer, "
               "ADD COLUMN failed_releases integer[] NOT NULL DEFAULT '{}'")


def downgrade() -> None:
    op.execute("ALTER TABLE views.route_apps DROP COLUMN deployed_release, "
               "DROP COLUMN failed_releases")
    op.execute("ALTER TABLE views.releases DROP COLUMN failure_reason, "
               "DROP COLUMN status_position")
    op.execute("ALTER TABLE views.apps DROP COLUMN deployed_release, "
               "DROP COLUMN deployed_position")
