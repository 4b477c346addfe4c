"""The API's exception tree: each failure a client can act on, with the HTTP status it gets.

ApiError
 ├── Unauthorized   401  no token, or a token that is unknown or revoked
 ├── Forbidden      403  a valid token whose role or membership does not reach this
 ├── NotFound       404  no such app, release, route...
 ├── Conflict       409  someone else changed it first (carries the current state)
 ├── TooLarge       413  a bundle over the size limit
 ├── Unprocessable  422  well-formed but refused (bad bundle, unknown process type...)
 └── Unavailable    503  nothing can serve it now (no host agent to run a command on)

Ledger and marshmallow errors are mapped in api/app.py, in one place.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, fields: dict[str, Any] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "fields": self.fields,
                **self.extra}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class Unprocessable(ApiError):
    status, code = 422, "unprocessable"


class Unavailable(ApiError):
    status, code = 503, "unavailable"
