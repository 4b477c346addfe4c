"""The JSON API: Flask app factory, marshmallow schemas, command handlers, auth, OpenAPI.
Wired with real dependencies by `tally serve api` (tally/api_settings.py)."""

from __future__ import annotations

from api.app import create_app
from api.services import Settings

__all__ = ["Settings", "create_app"]
