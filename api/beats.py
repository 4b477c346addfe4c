"""The heartbeat, the API's hottest request (2,000 a second for 10,000 hosts), taken before
Flask: a WSGI layer answers a plain one (an agent's token for its own host, a JSON body of
known numeric fields in range) straight from this process's directory of tokens, and hands
anything else, with its body, to the Flask route `POST /hosts/<host>/heartbeats`, which
answers errors, admins and odd bodies as every route does. Both queue the heartbeat the
same way (`accept`) and answer the same JSON. Flask's request context, routing, schema load
and response object were about half of a heartbeat's CPU in the API.

Revocations are checked per batch (api/heartbeats.py), so neither path reads the ledger.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable
from typing import Any, cast

from marshmallow import validate

from api import schemas
from api.auth import Principal
from api.services import Services
from ledger import NewEvent

PATH = re.compile(r"/hosts/([^/]+)/heartbeats")
MAX_BODY = 4096
"""A plain heartbeat's body is under 200 bytes; a larger one goes the long way."""
FIELDS = {name: (f.load_default, float if name == "load" else int,
                 cast(validate.Range, f.validators[0]).max)
          for name, f in schemas.Heartbeat().fields.items()}
"""The heartbeat's fields: (default, type, maximum), all numbers from 0."""

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def plain(data: Any) -> dict[str, Any] | None:
    """The body as schemas.Heartbeat loads it, if it is plain (known fields, numbers of the
    fields' types in range: every agent's); None for the schema to judge (and word the 4xx)."""
    if not isinstance(data, dict) or not data.keys() <= FIELDS.keys():
        return None
    out = {}
    for name, (default, type_, top) in FIELDS.items():
        v = data.get(name, default)
        if (type(v) is not type_ and not (type_ is float and type(v) is int)) \
                or not 0 <= v <= top:
            return None
        out[name] = type_(v)
    return out


def accept(svc: Services, caller: Principal, host_id: str, beat: dict[str, Any]) -> int:
    """Queue the heartbeat for its batch; the host's desired version, for the answer."""
    svc.heartbeats.submit(f"heartbeat-{host_id}", NewEvent(
        "HostHeartbeat", {"host_id": host_id, **beat},
        {"actor": caller.name, "role": caller.role}),
        (caller.name, caller.token_id) if caller.token_id else None)
    return svc.placements(wait=False).version(host_id)


class HeartbeatPath:
    """WSGI middleware: plain heartbeats answered here, everything else by `app`."""

    def __init__(self, app: WSGIApp, services: Services) -> None:
        self.app, self.services = app, services
        self.answered = 0
        """Heartbeats answered here (the rest went to the route)."""

    def __call__(self, env: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        if env.get("REQUEST_METHOD") == "POST" and (
                m := PATH.fullmatch(env.get("PATH_INFO", ""))):
            answer = self._plain(m.group(1), env)
            if answer is not None:
                self.answered += 1
                start_response("202 ACCEPTED", [("Content-Type", "application/json"),
                                                ("Content-Length", str(len(answer)))])
                return [answer]
        return self.app(env, start_response)

    def _plain(self, host_id: str, env: dict[str, Any]) -> bytes | None:
        """The answer to a plain heartbeat, or None (the body put back for the route)."""
        scheme, _, token = env.get("HTTP_AUTHORIZATION", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        if not env.get("CONTENT_TYPE", "").startswith("application/json"):
            return None
        try:
            length = int(env.get("CONTENT_LENGTH") or "-1")
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY:
            return None
        raw = env["wsgi.input"].read(length)
        env["wsgi.input"] = io.BytesIO(raw)
        try:
            who = self.services.directory().lookup(token)
            if who is None or who.role != "agent" or who.host_id != host_id:
                return None  # unknown (perhaps just issued), another host's, an admin's
            beat = plain(json.loads(raw))
            if beat is None:
                return None
            desired = accept(self.services, who, host_id, beat)
        except Exception:  # the route says what went wrong, as JSON
            return None
        return b'{"accepted":true,"desired":%d}\n' % desired  # as Flask's jsonify words it
