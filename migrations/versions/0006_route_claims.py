"""Views: routes owned by claim. The routes projector keeps who holds each hostname
(DomainClaimed/DomainReleased) and the platform's suffix (PlatformSuffixSet), so a route
goes only to the app holding its hostname's claim, never to whichever app wrote last.

route_claims    hostname -> the app holding its claim (wildcards as `*.suffix`).
route_platform  one row: the platform suffix apps answer under (`<app>.<suffix>`).

The routes projector is reset to position 0 here: it must see the claims recorded before
this revision (it catches up at its next start; the public `routes` rows stay until then).

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE views.route_claims (hostname text PRIMARY KEY, app text NOT NULL)")
    op.execute("CREATE TABLE views.route_platform (id integer PRIMARY KEY CHECK (id = 1), "
               "suffix text NOT NULL)")
    op.execute("GRANT SELECT ON views.route_claims, views.route_platform "
               "TO tally_reader, tally_writer")
    op.execute("DELETE FROM views.route_apps")
    op.execute("DELETE FROM views.route_hosts")
    op.execute("DELETE FROM views.route_backends")
    op.execute("UPDATE views.projector_checkpoints SET position = 0 WHERE name = 'routes'")


def downgrade() -> None:
    op.execute("DROP TABLE views.route_claims, views.route_platform")
