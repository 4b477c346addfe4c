"""The Flask app factory: wires Services, the routes, and the one error handler that turns
every failure into JSON `{"error", "message", "fields"}`, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from api import (  # noqa: F401  (routes register)
    openapi,
    routes_addons,
    routes_apps,
    routes_backups,
    routes_balancers,
    routes_builders,
    routes_builds,
    routes_certs,
    routes_history,
    routes_hosts,
    routes_quotas,
    routes_runs,
    routes_users,
    routes_views,
    web,
)
from api.beats import HeartbeatPath
from api.errors import ApiError
from api.services import Services, Settings
from ledger import InvalidEvent, LedgerUnavailable, VersionConflict
from ledger.errors import IdempotencyConflict, LedgerError

log = logging.getLogger("tally.api")


def create_app(settings: Settings) -> Flask:
    """A WSGI app over the ledger at settings.dsn. Connects lazily, on the first request."""
    app = Flask("tally.api")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_bundle_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["tally"] = Services(settings)
    web.install(app)
    app.add_url_rule("/healthz", "healthz", healthz)
    spec = openapi.spec()
    app.add_url_rule("/openapi.json", "openapi", lambda: jsonify(spec))
    app.register_error_handler(Exception, handle_error)
    app.wsgi_app = HeartbeatPath(  # type: ignore[method-assign,assignment]
        app.wsgi_app, app.extensions["tally"])
    return app


def healthz() -> ResponseReturnValue:
    """Up, and whether the ledger answers (503 when it does not)."""
    try:
        head = web.services().ledger.head()
    except LedgerError:
        return jsonify({"status": "ledger unavailable", "ledger_head": None}), 503
    return jsonify({"status": "ok", "ledger_head": head})


def handle_error(exc: Exception) -> ResponseReturnValue:
    status, body = error_body(exc)
    if status >= 500:
        log.error("request failed: %s", exc, exc_info=status == 500)
    return jsonify(body), status


def error_body(exc: Exception) -> tuple[int, dict[str, Any]]:
    """Map any exception to (status, JSON body), in this one place."""
    if isinstance(exc, ApiError):
        return exc.status, exc.body()
    if isinstance(exc, VersionConflict):
        return 409, _body("conflict", str(exc))
    if isinstance(exc, InvalidEvent):
        return 422, _body("invalid_event", str(exc), exc.fields)
    if isinstance(exc, IdempotencyConflict):
        return 409, _body("conflict", str(exc))
    if isinstance(exc, LedgerUnavailable):
        return 503, _body("unavailable", "the ledger is unavailable; try again shortly")
    if isinstance(exc, HTTPException):
        code = exc.code or 500
        names = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return code, _body(names.get(code, "http_error"), exc.description or exc.name)
    return 500, _body("internal", "internal error; the operator can find it in the API log")


def _body(code: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": code, "message": message, "fields": fields or {}}
