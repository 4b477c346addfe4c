"""The balancer's: HTTPS and static files in the routes view, and router samples beside the
agents' stats.

Views: Each route says whether plain HTTP is redirected to
HTTPS and the HSTS value to send (the app's TALLY_FORCE_HTTPS / TALLY_HSTS config vars,
ledger/tls.py), and carries the certificate the balancers serve for it by SNI (`tls`: the
chain, the sealed key, not_after; null: none).

route_apps    + https_only, hsts (the routes projector's own copy of those config vars),
              challenges (the ACME HTTP-01 challenges of its orders under way),
              slugs (release -> slug digest, from BuildSucceeded)
route_certs   cert_id -> app, hostnames, chain, sealed key, not_after (its own copy of the
              app's Certificate* events)
routes        + https_only, hsts, tls, challenges (token -> key authorization, which the
              balancers answer at /.well-known/acme-challenge/TOKEN), slug (the newest
              serving release with a slug: {release, digest}; balancers serve its static
              files)

stats.router_samples  what each balancer routed to an app since its previous sample (every
              10 s): requests by status class, held, retries, the latency sum and the
              non-empty latency buckets (ledger/latency.py), so `tally stats` reads
              percentiles over any window.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("routes", "route_apps"):
        op.execute(f"ALTER TABLE views.{table} ADD COLUMN https_only boolean NOT NULL "
                   "DEFAULT false, ADD COLUMN hsts text NOT NULL DEFAULT ''")
    op.execute("ALTER TABLE views.routes ADD COLUMN tls jsonb")
    for table in ("routes", "route_apps"):
        op.execute(f"ALTER TABLE views.{table} ADD COLUMN challenges jsonb NOT NULL "
                   "DEFAULT '{}'")
    op.execute("ALTER TABLE views.route_apps ADD COLUMN slugs jsonb NOT NULL DEFAULT '{}'")
    op.execute("ALTER TABLE views.routes ADD COLUMN slug jsonb")
    op.execute("""CREATE TABLE views.route_certs (
        cert_id    text PRIMARY KEY,
        app        text NOT NULL,
        hostnames  text[] NOT NULL,
        cert_pem   text NOT NULL,
        key_sealed text NOT NULL,
        not_after  text NOT NULL)""")
    op.execute("CREATE INDEX route_certs_app ON views.route_certs (app)")
    op.execute("GRANT SELECT ON views.route_certs TO tally_reader, tally_writer")
    op.execute("""CREATE TABLE stats.router_samples (
        at           timestamptz NOT NULL DEFAULT now(),
        app          text NOT NULL,
        balancer_id  text NOT NULL,
        requests     bigint NOT NULL DEFAULT 0,
        s1xx bigint NOT NULL DEFAULT 0, s2xx bigint NOT NULL DEFAULT 0,
        s3xx bigint NOT NULL DEFAULT 0, s4xx bigint NOT NULL DEFAULT 0,
        s5xx bigint NOT NULL DEFAULT 0,
        held         bigint NOT NULL DEFAULT 0,
        retries      bigint NOT NULL DEFAULT 0,
        latency_sum  double precision NOT NULL DEFAULT 0,
        buckets      jsonb NOT NULL DEFAULT '{}')""")
    op.execute("CREATE INDEX router_samples_app_at ON stats.router_samples (app, at)")
    op.execute("GRANT INSERT, SELECT ON stats.router_samples TO tally_writer")
    op.execute("GRANT SELECT ON stats.router_samples TO tally_reader")


def downgrade() -> None:
    op.execute("DROP TABLE stats.router_samples")
    op.execute("DROP TABLE views.route_certs")
    op.execute("ALTER TABLE views.routes DROP COLUMN tls, DROP COLUMN challenges, "
               "DROP COLUMN slug")
    op.execute("ALTER TABLE views.route_apps DROP COLUMN challenges, DROP COLUMN slugs")
    for table in ("routes", "route_apps"):
        op.execute(f"ALTER TABLE views.{table} DROP COLUMN https_only, DROP COLUMN hsts")
