"""Alembic runtime: connects with a libpq DSN (multi-host DSNs work) and runs revisions."""

import os

import psycopg2
from alembic import context
from sqlalchemy import create_engine, pool

dsn = context.config.attributes.get("dsn") or os.environ["TALLY_OWNER_DSN"]
engine = create_engine(
    "postgresql+psycopg2://", creator=lambda: psycopg2.connect(dsn), poolclass=pool.NullPool
)
with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
