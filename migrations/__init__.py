"""Alembic environment and revisions for the ledger and view schemas.

All DDL of tally lives here. `upgrade(dsn)` is what `tally ledger init`, `make up` and the
test fixtures call; `alembic` on the command line works too (see alembic.ini).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

HERE = Path(__file__).resolve().parent


def config(dsn: str) -> Config:
    """An Alembic config pointing at this folder, for the given libpq DSN."""
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["dsn"] = dsn
    return cfg


def upgrade(dsn: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (idempotent)."""
    command.upgrade(config(dsn), revision)
