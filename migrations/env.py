"""Alembic runtime: connects with a libpq DSN (multi-host DSNs work) and runs revisions.

The DSN comes from whoever runs Alembic, never from the environment (configuration is read
in one place, tally/config.py): tally passes it (`migrations.upgrade(dsn)`); by hand, say it
on the command line: `alembic -c migrations/alembic.ini -x dsn=postgresql://... upgrade head`.
"""

import psycopg2
from alembic import context
from sqlalchemy import create_engine, pool

dsn = context.config.attributes.get("dsn") or context.get_x_argument(as_dictionary=True).get(
    "dsn")
if not dsn:
    raise SystemExit("which database? run Alembic with -x dsn=<the tally_owner role's DSN> "
                     "(tally itself passes it: `tally ledger start` upgrades the schema)")
engine = create_engine(
    "postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn), poolclass=pool.NullPool
)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
