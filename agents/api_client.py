"""How a fleet host speaks to the control plane: HTTP to the API with its host-scoped
token, never a ledger connection (DESIGN.md, "Trust boundaries").

Every daemon on a fleet host (the host agent, a builder, a balancer) uses this client: it
keeps one keep-alive connection, and sorts failures into the two a caller handles
differently: `ApiAway` (no answer, a 5xx, a timeout: try again later, keep what was to be
sent) and `ApiRefused` (a 4xx: sending it again will not help; the message says why).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
from typing import Any, BinaryIO


class ApiError(Exception):
    """The API did not do what was asked."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiAway(ApiError):
    """No answer, or a 5xx: transient, worth sending again later."""


class ApiRefused(ApiError):
    """A 4xx: the request itself is refused; sending it again gives the same answer."""


class HostApi:
    """The API as one host sees it: its token opens only its own host's routes."""

    def __init__(self, base: str, token: str, host_id: str, timeout: float = 10.0) -> None:
        url = urllib.parse.urlsplit(base)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"API URL {base!r} must look like http://host:port")
        self.base, self.token, self.host_id, self.timeout = base, token, host_id, timeout
        self._url = url
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    # -- the routes a host uses --------------------------------------------------------------
    def register(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Register the host; the answer carries its key of run tickets (`run_key`)."""
        return dict(self.call("PUT", f"/hosts/{self.host_id}", fields))

    def heartbeat(self, fields: dict[str, Any]) -> int:
        """Say the host is alive; returns the version of its desired state."""
        return int(self.call("POST", f"/hosts/{self.host_id}/heartbeats", fields)["desired"])

    def desired(self, after: int = 0, apps: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
        """The host's desired state if it moved past `after` (`changed` says whether)."""
        query = urllib.parse.urlencode([("after", after), *(("apps", a) for a in apps)])
        return self.call("GET", f"/hosts/{self.host_id}/desired?{query}")

    def report(self, instance_id: str, type_: str, data: dict[str, Any], key: str) -> None:
        """One instance event; `key` makes sending it again harmless."""
        self.call("POST", f"/instances/{instance_id}/events",
                  {"type": type_, "data": data, "key": key})

    def run_ended(self, app: str, number: int, data: dict[str, Any], key: str) -> None:
        """How a one-off run sent to this host ended; `key` makes sending it again harmless."""
        self.call("POST", f"/apps/{app}/runs/{number}/ended", {**data, "key": key})

    def stats(self, samples: list[dict[str, Any]]) -> None:
        self.call("POST", f"/hosts/{self.host_id}/stats", {"samples": samples})

    # -- the wire ----------------------------------------------------------------------------
    def call(self, method: str, path: str, body: Any = None,
             upload: BinaryIO | None = None) -> Any:
        """One request on the kept connection (a fresh one if it went stale); the JSON
        answer, or ApiAway / ApiRefused. `upload`: a file sent as the body, as is (a
        tar.gz), instead of JSON."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if upload is not None:
            headers["Content-Type"] = "application/gzip"
            headers["Content-Length"] = str(os.fstat(upload.fileno()).st_size)
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    if upload is not None:
                        upload.seek(0)
                    conn.request(method, path, upload if upload is not None else payload,
                                 headers)
                    reply = conn.getresponse()
                    status, raw = reply.status, reply.read()
                    break
                except (OSError, http.client.HTTPException) as exc:
                    self.close()
                    # A kept connection the server closed fails on first use: once more.
                    if attempt == 2 or not isinstance(
                            exc, http.client.RemoteDisconnected | BrokenPipeError |
                            ConnectionResetError):
                        raise ApiAway(f"{method} {path}: the API at {self.base} does not "
                                      f"answer ({exc or type(exc).__name__})") from exc
        answer = _json(raw)
        if status >= 500:
            raise ApiAway(f"{method} {path}: {status} {answer.get('message', '')}", status)
        if status >= 400:
            raise ApiRefused(f"{method} {path}: {status} {answer.get('message', '')}", status)
        return answer

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = (http.client.HTTPSConnection if self._url.scheme == "https"
                   else http.client.HTTPConnection)
            self._conn = cls(self._url.hostname or "", self._url.port, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class BuilderApi(HostApi):
    """The API as a builder sees it (a builder token: role `builder`, bound to the
    builder's name): what to build, claims, output and outcomes (api/routes_builders.py)."""

    def queue(self) -> list[dict[str, Any]]:
        """Builds that may be claimed now, newest first: app, release, attempt."""
        return list(self.call("GET", "/builds/queue")["builds"])

    def claim(self, app: str, release: int, lease_s: float) -> dict[str, Any]:
        """Claim a build (ApiRefused 409: another builder has it); the job, or its
        `reused_from` when the release got an earlier slug."""
        return self.call("POST", f"{_build(app, release)}/claim", {"lease_s": lease_s})

    def renew(self, app: str, release: int, attempt: int) -> None:
        self.call("POST", f"{_build(app, release)}/renew", {"attempt": attempt})

    def output(self, app: str, release: int, attempt: int, text: str) -> None:
        self.call("POST", f"{_build(app, release)}/output", {"attempt": attempt, "text": text})

    def failed(self, app: str, release: int, attempt: int, reason: str, log_tail: list[str],
               seconds: float) -> None:
        self.call("POST", f"{_build(app, release)}/failed", {
            "attempt": attempt, "reason": reason, "log_tail": log_tail, "seconds": seconds})

    def upload_slug(self, app: str, release: int, attempt: int, seconds: float,
                    slug: BinaryIO) -> None:
        query = urllib.parse.urlencode({"attempt": attempt, "seconds": seconds})
        self.call("PUT", f"{_build(app, release)}/slug?{query}", upload=slug)


def _build(app: str, release: int) -> str:
    return f"/apps/{urllib.parse.quote(app)}/releases/{int(release)}/build"


def _json(raw: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        return {"message": raw[:200].decode("utf-8", "replace")}
    return answer if isinstance(answer, dict) else {"items": answer}
