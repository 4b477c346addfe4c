"""The JSON API: Flask app factory, marshmallow schemas, command handlers, auth, OpenAPI."""

from __future__ import annotations

from api.app import create_app
from api.services import Settings

__all__ = ["Settings", "create_app", "settings_from_env"]


def settings_from_env() -> Settings:
    """Settings for the API from tally's configuration (TALLY_* environment variables)."""
    from tally.config import Config

    cfg = Config.from_env()
    return Settings(dsn=cfg.cluster().dsn("tally_writer"), bundles_dir=cfg.bundles_dir,
                    max_bundle_bytes=cfg.max_bundle_bytes)
